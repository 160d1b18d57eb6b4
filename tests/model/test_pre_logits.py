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
