"""`Model.pre_logits` and `Model.project`: what chunked vocabulary losses read instead of logits.

On every model family of the equivalence test (tied, untied, factorised, MLM-transform heads,
output biases), masked and exported: projecting any slice of positions of the pre-logit states
gives that slice of the model's own logits, and the captured features are the forward's.
"""

import jax
import numpy as np
import pytest
from test_model_equivalence import FAMILIES, build, random_batch

from elastic_jax import arch as arch_lib
from elastic_jax import export


@pytest.mark.parametrize('family', list(FAMILIES))
def test_projected_chunks_of_pre_logits_are_the_logits(family):
  cfg, space, model = build(family, seed=len(family) + 1)
  batch = random_batch(cfg, seed=4)
  arch = arch_lib.unstack(space.sample(jax.random.key(2), 1))[0]
  for net, a in ((model, arch), (export.export(model, space.cfg, arch), None)):
    logits_BTV, feats = net(batch, a, capture=('hidden',))
    x_BTE, pre_feats = net.pre_logits(batch, a, capture=('hidden',))
    assert x_BTE.shape[:2] == logits_BTV.shape[:2]
    for start, stop in ((0, 4), (4, 8), (8, 11)):  # 11 positions in chunks of 4
      np.testing.assert_allclose(np.asarray(net.project(x_BTE[:, start:stop])),
                                 np.asarray(logits_BTV[:, start:stop]), rtol=1e-6, atol=1e-6)
    for want, got in zip(feats['hidden'], pre_feats['hidden'], strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('family', ['llama_gqa', 'mobilebert'])
def test_a_dense_model_asked_to_scan_its_layers_computes_the_same(family):
  """`pre_logits(scan=True)` (the training step's dense slices) runs runs of same-shaped layers
  in a `lax.scan`: the same states and per-layer features as layer by layer."""
  # In float64: summed in another order inside the scan, float32 states of the normless
  # MobileBERT (reaching ~1e3 here) round up to 2.4e-4 apart; float64 tests the maths.
  with jax.enable_x64(True):
    cfg, space, model = build(family, seed=len(family) + 2, dtype='float64')
    batch = random_batch(cfg, seed=5)
    dense = export.export(model, space.cfg, space.largest())
    assert len(set(dense.dims.layers)) == 1 and len(dense.dims.layers) > 1  # one run of layers
    x, feats = dense.pre_logits(batch, capture=('hidden',))
    scanned = lambda: dense.pre_logits(batch, capture=('hidden',), scan=True)
    assert 'scan' in str(jax.make_jaxpr(scanned)())
    x_scan, feats_scan = scanned()
    assert x_scan.dtype == np.float64
    # Equal to 1e-12 of each array's largest value (a wrong layer differs by O(1)).
    for got, want in zip([x_scan, *feats_scan['hidden']], [x, *feats['hidden']], strict=True):
      scale = float(np.max(np.abs(np.asarray(want))))
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12 * scale)
