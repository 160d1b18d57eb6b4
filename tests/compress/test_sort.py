"""Importance sorting: the permuted model computes what the original does (every supported
family, tiny random transformers checkpoints), scores are deterministic and match brute-force
ablations, grouped-query heads move with their KV group."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from elastic_jax import export as export_lib
from elastic_jax.compress import importance, permute
from elastic_jax.hf import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'hf'))
hf_testing = pytest.importorskip('hf_testing')


def calibration(seed=0, b=3, t=11, vocab=hf_testing.VOCAB):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, t - 3:] = 0
  return [{'tokens': tokens, 'targets': np.roll(tokens, -1, 1), 'segment_ids': seg,
           'weights': seg.astype(np.float32)}]


_MODELS = {}


def _family_model(family, tmp_path_factory):
  if family not in _MODELS:
    d = hf_testing.save_model(family, tmp_path_factory.mktemp(family))
    _MODELS[family] = convert.load_dense(d).model
  return family, _MODELS[family]


# Activation scores on every family; the Taylor variant (a backward pass per batch) on one
# post-norm MHA family and one grouped-query family.
CASES = [(f, 'activation') for f in hf_testing.FAMILIES] + [('bert', 'taylor'),
                                                           ('qwen2', 'taylor')]


def _logits(model, batch):
  return np.asarray(model({k: batch[k] for k in ('tokens', 'segment_ids')}))


@pytest.mark.parametrize('family,method', CASES)
def test_permuted_model_computes_the_same_logits(family, method, tmp_path_factory):
  family, model = _family_model(family, tmp_path_factory)
  batches = calibration()
  scores = importance.compute(model, batches, method=method)
  again = importance.compute(model, batches, method=method)
  for a, b in zip(scores.to_arrays().values(), again.to_arrays().values()):
    np.testing.assert_array_equal(a, b)  # deterministic
  perm = permute.from_scores(scores)
  ident = permute.identity(model)
  assert not np.array_equal(perm.hidden, ident.hidden)  # the test permutes something
  assert any(not np.array_equal(p, i) for p, i in zip(perm.ffn, ident.ffn))
  sorted_model = permute.apply(model, perm)
  batch = calibration(seed=1)[0]
  before, after = _logits(model, batch), _logits(sorted_model, batch)
  mask = batch['segment_ids'] != 0
  rel = np.max(np.abs(after - before)[mask]) / max(1.0, np.max(np.abs(before)[mask]))
  assert rel <= 1e-5, (family, rel)
  # The sorted model's scores are the original's, in sorted order.
  resorted, original = importance.compute(sorted_model, batches, method=method), scores
  np.testing.assert_allclose(resorted.hidden, original.hidden[perm.hidden], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(resorted.ffn[0], original.ffn[0][perm.ffn[0]], rtol=1e-4, atol=1e-6)
  assert np.all(np.diff(resorted.hidden) <= 1e-6 * np.max(resorted.hidden))


def test_gqa_groups_stay_aligned(tmp_path):
  model = convert.load_dense(hf_testing.save_model('llama', tmp_path)).model  # 6 heads, 2 groups
  perm = permute.from_scores(importance.compute(model, calibration()))
  for heads, groups in zip(perm.heads, perm.groups):
    per_group = len(heads) // len(groups)
    assert sorted(heads.tolist()) == list(range(len(heads)))
    for g, old_group in enumerate(groups):
      assert set(heads[g * per_group:(g + 1) * per_group] // per_group) == {old_group}
  sorted_model = permute.apply(model, perm)
  k_old = np.asarray(model.layers[0].blocks['transformer'].attn.k[...])
  k_new = np.asarray(sorted_model.layers[0].blocks['transformer'].attn.k[...])
  np.testing.assert_array_equal(k_new, k_old[perm.hidden][:, perm.groups[0]])


def _zeroed(model, path, index, axis):
  params = export_lib.flat_params(model)
  value = np.array(params[path])
  np.moveaxis(value, axis, 0)[index] = 0
  params[path] = value
  return export_lib.fill_model(nnx.eval_shape(lambda: model), params)


def test_scores_match_brute_force_ablation(tmp_path):
  """A head's score is the mean norm of what removing it changes in the attention output; an FFN
  neuron's, in the FFN output; computed here by zeroing their output-projection slices."""
  model = convert.load_dense(hf_testing.save_model('llama', tmp_path)).model
  batch = calibration()[0]
  scores = importance.compute(model, [batch])
  mask = batch['segment_ids'] != 0
  inputs = {k: batch[k] for k in ('tokens', 'segment_ids')}

  def feature(m, name, layer):
    return np.asarray(m(inputs, None, (name,))[1][name][layer])

  prefix = ('layers', 1, 'blocks', 'transformer')
  full_attn, full_ffn = feature(model, 'attn_out', 1), feature(model, 'ffn_out', 1)
  for head in (0, 4):
    ablated = feature(_zeroed(model, prefix + ('attn', 'o'), head, 0), 'attn_out', 1)
    expected = np.linalg.norm(full_attn - ablated, axis=-1)[mask].mean()
    np.testing.assert_allclose(scores.heads[1][head], expected, rtol=1e-4)
  for neuron in (3, 17):
    ablated = feature(_zeroed(model, prefix + ('mlp', 'down'), neuron, 0), 'ffn_out', 1)
    expected = np.linalg.norm(full_ffn - ablated, axis=-1)[mask].mean()
    np.testing.assert_allclose(scores.ffn[1][neuron], expected, rtol=1e-4)
  np.testing.assert_allclose(scores.groups[1], scores.heads[1].reshape(2, 3).sum(1))


def test_layer_loss_scores_are_loss_increases(tmp_path):
  model = convert.load_dense(hf_testing.save_model('gpt2', tmp_path)).model
  batches = calibration()
  scores = importance.compute(model, batches, layer_method='loss')
  assert scores.layers.shape == (3,)
  b = batches[0]

  def loss(logits):
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, b['targets'][..., None], -1)[..., 0]
    return float((nll * b['weights']).sum() / b['weights'].sum())
  base = loss(_logits(model, b))
  dropped = importance._dense_without_layer(model, 1)
  assert len(dropped.layers) == 2
  np.testing.assert_allclose(scores.layers[1], loss(_logits(dropped, b)) - base, rtol=1e-4,
                             atol=1e-6)
