"""cost.py: SCONE leaves the accelerator-resident parameters unchanged; its table counts apart."""

import jax
import numpy as np
from flax import nnx

from elastic_jax import cost
from elastic_jax.config import LayerDims, ModelConfig, ModelDims
from elastic_jax.model.supernet import Model
from elastic_jax.scone.config import SconeConfig


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_scone_costs_are_the_real_sizes():
  for cfg in (ModelConfig(vocab_size=17, max_len=23),
              ModelConfig(vocab_size=17, max_len=23, norm='rmsnorm', mlp='swiglu',
                          use_bias=False, norm_placement='post')):
    dims = ModelDims(hidden=11, head_dim=3, bottleneck_head_dim=0,
                     layers=(LayerDims(('transformer',), 3, 3, 7),) * 2)
    scone = SconeConfig(max_n=5, layers=3, width=6, heads=2, ffn=9)
    m = Model(cfg, dims, rngs=nnx.Rngs(0), scone=scone)
    whole = count(nnx.state(m, nnx.Param))
    fgram_model = count(nnx.state(m.scone, nnx.Param))
    c = cost.scone_cost(cfg, dims.hidden, scone, num_fgrams=101)
    assert c['fgram_model_params'] == fgram_model > 0
    # What stays on the accelerator at inference is the model without its f-gram model, whose
    # analytic cost is arch_cost's, as without SCONE.
    resident = int(cost.arch_cost(cfg, cost.dense_arch(dims), bottleneck_head_dim=0,
                                  seq_len=8)['params'])
    assert whole - fgram_model == resident == count(nnx.state(Model(cfg, dims,
                                                                    rngs=nnx.Rngs(0)), nnx.Param))
    assert c['table_bytes'] == np.zeros((101, 11), np.float32).nbytes
