"""On a briefly trained model, the prefixes the space chooses lose less after importance sorting
than before (half the FFN neurons, half the heads in whole KV groups, three quarters of the
hidden channels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elastic_jax import data, evaluation
from elastic_jax.arch import Arch
from elastic_jax.compress import importance, permute
from elastic_jax.config import LayerDims, ModelDims, model_config
from elastic_jax.losses import token_cross_entropy
from elastic_jax.model.supernet import Model


def _train(model, stream, steps):
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(evaluation.model_inputs(batch))
      total, weight = token_cross_entropy(logits, batch['targets'], batch['weights'])
      return total / weight
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  for _ in range(steps):
    batch = {k: jnp.asarray(v) for k, v in next(stream).items()
             if k in evaluation.MODEL_INPUTS + ('targets', 'weights')}
    params, opt, loss = step(params, opt, batch)
  return nnx.merge(graphdef, params), float(loss)


@pytest.mark.slow
def test_sorted_prefixes_lose_less_than_unsorted(tiny_cfg):
  cfg = model_config(tiny_cfg.model)
  layer = LayerDims(blocks=('transformer',), heads=4, kv_groups=2, ffn=64)
  dims = ModelDims(hidden=32, head_dim=8, bottleneck_head_dim=0, layers=(layer, layer))
  stream = data.train_iterator(tiny_cfg.data)
  model, final_loss = _train(Model(cfg, dims, rngs=nnx.Rngs(0)), stream, 150)
  assert final_loss < 6.0  # it learned something (uniform over 1024 tokens is 6.93)
  calibration = [next(stream) for _ in range(4)]
  sorted_model = permute.apply(model, permute.from_scores(importance.compute(model,
                                                                              calibration)))
  held_out = data.eval_batches(tiny_cfg.data)
  full = evaluation.evaluate(model, held_out)['loss']
  np.testing.assert_allclose(evaluation.evaluate(sorted_model, held_out)['loss'], full,
                             rtol=1e-5)
  i32 = lambda v: jnp.asarray(v, jnp.int32)
  for hidden, heads, groups, ffn in ((32, 2, 1, 32), (24, 4, 2, 64), (32, 4, 2, 32)):
    arch = Arch(hidden=i32(hidden), depth=i32(2), head_dim=i32(8), block=i32([0, 0]),
                heads=i32([heads] * 2), kv_groups=i32([groups] * 2), ffn=i32([ffn] * 2),
                inner=i32([0, 0]), ffn_layers=i32([1, 1]), fgrams=i32(0),
                fgram_layers=i32(0), fgram_ffn=i32(0))  # no SCONE: 0 = the whole
    before = evaluation.evaluate(model, held_out, arch)['loss'] - full
    after = evaluation.evaluate(sorted_model, held_out, arch)['loss'] - full
    assert after < before, (hidden, heads, groups, ffn, before, after)
