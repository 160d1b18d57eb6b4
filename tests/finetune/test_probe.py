"""LP-FT's linear probe (`finetune.linear_probe`) against scikit-learn: the head it fits minimises
the run's own loss plus the kernel's L2 penalty, so with MSE it is ridge regression and with
cross-entropy multinomial logistic regression; and `finetune` installs exactly that head."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_trainer import decoder_dir  # noqa: F401  (the fixture: a tiny exported decoder)

from elastic_jax.data.glue_tasks import get_task
from elastic_jax.errors import UserError
from elastic_jax.finetune import probe, trainer
from elastic_jax.finetune.glue_job import GlueJob

linear_model = pytest.importorskip('sklearn.linear_model', reason='scikit-learn absent')


def _alpha(x, n, l2):
  """scikit-learn's penalty for ours: the probe penalises the kernel of the features divided by
  their common scale (root-mean-square deviation), i.e. the raw kernel by l2 * scale^2."""
  return n * l2 * np.mean(np.square(x - x.mean(0)))


def _features(rng, n, d):
  """Features of unequal scales around a non-zero mean, as pooled hidden states are."""
  return (rng.randn(n, d) * rng.uniform(0.1, 3.0, d) + rng.randn(d)).astype(np.float32)


def _loss(task_name, **cfg_fields):
  cfg = trainer.default_config()
  cfg.update(**cfg_fields)
  job = GlueJob(get_task(task_name))
  return lambda out, batch, teacher: job.loss(out, batch, teacher, cfg)


@pytest.mark.parametrize('l2', [1e-3, 0.1])
def test_regression_probe_is_ridge_regression(l2):
  rng = np.random.RandomState(0)
  x = _features(rng, 300, 10)
  y = (x @ rng.randn(10) + rng.randn(300)).astype(np.float32)
  kernel, bias, used = probe.fit_head(x, y, None, 1, _loss('stsb'), l2)
  assert used == l2
  # mean squared error + c |w|^2  ==  (|y - Xw - b|^2 + N c |w|^2) / N: ridge's alpha is N * c.
  ridge = linear_model.Ridge(alpha=_alpha(x, len(y), l2)).fit(x.astype(np.float64), y)
  np.testing.assert_allclose(kernel[:, 0], ridge.coef_, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bias[0], ridge.intercept_, rtol=1e-4, atol=1e-5)


def test_classification_probe_is_multinomial_logistic_regression():
  rng = np.random.RandomState(1)
  x = _features(rng, 400, 8)
  labels = np.argmax(x @ rng.randn(8, 3) + 2 * rng.randn(400, 3), axis=1).astype(np.int32)
  l2 = 1e-2
  kernel, bias, _ = probe.fit_head(x, labels, None, 3, _loss('mnli'), l2)
  # mean CE + c |W|^2, times C = 1 / (2 N c): scikit-learn's C * sum CE + |W|^2 / 2.
  logistic = linear_model.LogisticRegression(C=1 / (2 * _alpha(x, len(labels), l2)), tol=1e-10,
                                             max_iter=10_000).fit(x.astype(np.float64), labels)
  logits = x @ kernel + bias
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(probs, logistic.predict_proba(x), atol=2e-4)
  # The L2 penalty makes the kernel unique (its columns sum to zero), as scikit-learn's is.
  np.testing.assert_allclose(kernel, logistic.coef_.T, rtol=2e-3, atol=2e-4)


def test_distilling_probe_fits_the_teachers_outputs():
  rng = np.random.RandomState(2)
  x = _features(rng, 200, 6)
  labels = rng.randn(200).astype(np.float32)
  teacher = (x @ rng.randn(6, 1) + 0.5).astype(np.float32)  # a regression teacher [N, 1]
  l2 = 1e-2
  kernel, bias, _ = probe.fit_head(x, labels, teacher, 1, _loss('stsb', hard_weight=0.0), l2)
  ridge = linear_model.Ridge(alpha=_alpha(x, len(labels), l2)).fit(x.astype(np.float64),
                                                                   teacher[:, 0])
  np.testing.assert_allclose(kernel[:, 0], ridge.coef_, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bias[0], ridge.intercept_, rtol=1e-4, atol=1e-5)


def test_finetune_starts_from_the_probed_head(decoder_dir, shared_data, tmp_path):  # noqa: F811
  """With learning rate 0 the best checkpoint's head is the probe's: ridge regression of the
  training rows' labels on the model's own pooled features (computed here, not by the trainer)."""
  cfg = trainer.default_config()
  cfg.update(glue_dir=str(shared_data / 'glue'), cache_dir=str(tmp_path / 'cache'), seq_len=32,
             batch_size=16, epochs=1, max_train_examples=48, max_dev_examples=16,
             learning_rate=0.0, weight_decay=0.0, probe_l2=(1e-2,))
  logs = []
  trainer.finetune(decoder_dir, 'stsb', tmp_path / 'w', cfg, log=logs.append)
  assert any('linear probe' in m for m in logs)
  clf, job, _ = trainer.load_best(tmp_path / 'w')
  tokenizer = trainer._load_model_and_tokenizer(decoder_dir)[1]
  train, _ = job.load(cfg, tokenizer, 'decoder', 32)
  batch = {k: jnp.asarray(train[k]) for k in ('tokens', 'segment_ids', 'positions',
                                              'token_types')}
  features = np.asarray(nnx.jit(lambda m, b: m.pooled(b))(clf, batch), np.float64)
  ridge = linear_model.Ridge(alpha=_alpha(features, len(features), 1e-2)).fit(features,
                                                                               train['label'])
  np.testing.assert_allclose(np.asarray(clf.kernel[...])[:, 0], ridge.coef_, rtol=2e-3,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(clf.bias[...])[0], ridge.intercept_, rtol=2e-3,
                             atol=1e-4)


def test_cross_validation_chooses_the_penalty_of_least_held_out_loss():
  """Brute force: refit every candidate on each fold's complement with a single penalty and
  score the held-out fold; the probe must pick the argmin and return that penalty's fit."""
  rng = np.random.RandomState(3)
  x = _features(rng, 60, 20)  # few rows, many features: a penalty matters
  y = (x[:, 0] + 2 * rng.randn(60)).astype(np.float32)
  loss = _loss('stsb')
  candidates = (1e-4, 1e-2, 1.0, 100.0)
  _, _, chosen = probe.fit_head(x, y, None, 1, loss, candidates, folds=4)
  fold = np.random.default_rng(0).permutation(60) % 4
  held = []
  for c in candidates:
    errors = []
    for f in range(4):
      ridge = linear_model.Ridge(alpha=_alpha(x, 60, c) * np.mean(fold != f)).fit(
          x[fold != f].astype(np.float64), y[fold != f])
      errors.append(np.mean((ridge.predict(x[fold == f]) - y[fold == f]) ** 2))
    held.append(np.mean(errors))
  assert chosen == candidates[int(np.argmin(held))]
  assert len(set(np.round(held, 3))) == len(candidates)  # the choice is not a tie
  kernel, _, _ = probe.fit_head(x, y, None, 1, loss, (chosen,))
  want, _, _ = probe.fit_head(x, y, None, 1, loss, candidates, folds=4)
  np.testing.assert_array_equal(kernel, want)


@pytest.mark.parametrize('l2, folds, match', [((), 5, 'probe_l2'), ((-1.0,), 5, 'probe_l2'),
                                              ((0.1, 1.0), 1, 'probe_folds')])
def test_bad_probe_settings_are_one_clear_error(l2, folds, match):
  with pytest.raises(UserError, match=match):
    probe.fit_head(np.zeros((10, 2), np.float32), np.zeros(10, np.float32), None, 1,
                   _loss('stsb'), l2, folds)
