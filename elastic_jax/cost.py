"""Analytic cost of an architecture, jittable, from the arch alone.

`arch_cost` works on traced int32 arrays (inside `jit`, under `vmap` over a population), so search
can apply parameter / FLOP / memory budgets without building any model. Its parameter count equals
the exported dense model's real parameter count exactly (tested); the per-block formulas live with
the block classes in `model/blocks.py`, so a new block type brings its own.

FLOPs count multiply-adds as 2 FLOPs, per token, at sequence length `seq_len`, as executed by this
implementation (attention scores over all `seq_len` keys, causal or not); training = 3 x forward.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from elastic_jax.arch import Arch, host_jit
from elastic_jax.config import BLOCK_TYPES, ModelConfig, ModelDims
from elastic_jax.model.blocks import BLOCKS, linear_params, norm_params


def _embed_head_cost(cfg: ModelConfig, h):
  """Parameters and matmul MACs per token outside the layers."""
  e = cfg.embed_dim if cfg.factorised else h
  params = cfg.vocab_size * e
  macs = 0
  if cfg.factorised:
    params = params + linear_params(cfg, cfg.embed_dim, h)
    macs = macs + cfg.embed_dim * h
  if cfg.positions == 'learned':
    params = params + cfg.max_len * h
  params = params + cfg.type_vocab_size * h
  params = params + norm_params(cfg, h)  # embedding norm (post) or final norm (pre)
  if cfg.head_transform:
    params = params + linear_params(cfg, h, e) + norm_params(cfg, e)
    macs = macs + h * e
  elif cfg.factorised:
    params = params + h * e
    macs = macs + h * e
  if not cfg.tie_embeddings:
    params = params + e * cfg.vocab_size
  if cfg.output_bias:
    params = params + cfg.vocab_size
  if cfg.pooler:  # not part of the LM forward: parameters only
    params = params + h * h + h
  macs = macs + e * cfg.vocab_size
  return params, macs


@host_jit(static_argnames=('cfg', 'bottleneck_head_dim', 'seq_len'))
def arch_cost(cfg: ModelConfig, arch: Arch, *, bottleneck_head_dim: int, seq_len: int) -> dict:
  """Costs of one arch (or, under vmap, of each arch of a population; from host code, one
  compiled call).

  Returns int32 `params` and float32 `flops_per_token`, `train_flops_per_token`,
  `vocab_flops_per_token` (the vocabulary projection's share of `flops_per_token`),
  `kv_cache_bytes_per_token`, `activation_bytes_per_token` (stored for backward, estimate),
  `param_bytes`, and `table_mb`: SCONE's precomputed f-gram table of the arch in host memory
  (float32 [arch.fgrams, arch.hidden], in MB; 0 without SCONE). The f-gram count and the f-gram
  model's size change nothing else: the accelerator receives gathered rows as an input.
  """
  h = arch.hidden
  on = arch.layer_on()
  sizes = {'hidden': h, 'heads': arch.heads, 'kv_groups': arch.kv_groups,
           'head_dim': arch.head_dim, 'ffn': arch.ffn, 'inner': arch.inner,
           'bottleneck_head_dim': bottleneck_head_dim, 'ffn_layers': arch.ffn_layers}
  totals = None
  for name, block in BLOCKS.items():
    c = block.cost(cfg, sizes)
    chosen = on & (arch.block == BLOCK_TYPES.index(name))
    c = {k: jnp.where(chosen, jnp.asarray(v, jnp.float32 if k != 'params' else jnp.int32), 0)
         for k, v in c.items()}
    totals = c if totals is None else {k: totals[k] + c[k] for k in c}
  layer_params = jnp.sum(totals['params'])
  embed_params, embed_macs = _embed_head_cost(cfg, h)
  params = (layer_params + embed_params).astype(jnp.int32)
  attn_macs = 2.0 * seq_len * jnp.sum(totals['attn_width'])
  macs = jnp.sum(totals['matmul_macs']) + jnp.asarray(embed_macs, jnp.float32) + attn_macs
  flops = 2.0 * macs
  act_bytes = jnp.dtype(cfg.dtype).itemsize
  attn_probs = seq_len * jnp.sum(totals['heads'])  # one row of probabilities per head and token
  return {
      'params': params,
      'flops_per_token': flops,
      'train_flops_per_token': 3.0 * flops,
      'vocab_flops_per_token': 2.0 * cfg.vocab_size * jnp.asarray(
          cfg.embed_dim if cfg.factorised else h, jnp.float32),
      'kv_cache_bytes_per_token': act_bytes * jnp.sum(totals['kv_entries']),
      'activation_bytes_per_token': act_bytes * (jnp.sum(totals['act_entries']) + attn_probs
                                                 + 2.0 * h),
      'param_bytes': jnp.dtype(cfg.param_dtype).itemsize * params.astype(jnp.float32),
      'table_mb': 4e-6 * arch.fgrams.astype(jnp.float32) * h.astype(jnp.float32),
  }


def dense_arch(dims: ModelDims) -> Arch:
  """The arch a dense model computes, in its own one-point space (for costing exported models)."""
  layers = dims.layers
  return Arch(
      hidden=np.int32(dims.hidden), depth=np.int32(len(layers)),
      head_dim=np.int32(dims.head_dim),
      block=np.asarray([BLOCK_TYPES.index(l.blocks[0]) for l in layers], np.int32),
      heads=np.asarray([l.heads for l in layers], np.int32),
      kv_groups=np.asarray([l.kv_groups for l in layers], np.int32),
      ffn=np.asarray([l.ffn for l in layers], np.int32),
      inner=np.asarray([l.inner for l in layers], np.int32),
      ffn_layers=np.asarray([l.ffn_layers for l in layers], np.int32),
      fgrams=np.int32(0), fgram_layers=np.int32(0), fgram_ffn=np.int32(0),
  )


def scone_cost(cfg: ModelConfig, hidden: int, scone, num_fgrams: int, *, layers=None,
               ffn=None) -> dict:
  """What SCONE (elastic_jax/scone) costs besides `arch_cost`, which it leaves unchanged.

  At inference the f-gram embeddings are rows of a table precomputed after training and kept in
  host memory (or on disk): the accelerator holds and runs exactly the arch's parameters and
  FLOPs (`arch_cost`); it receives the gathered rows as an input, like the tokens. Returns
  `table_bytes` (float32 [num_fgrams, hidden]), `index_bytes` (the f-gram file) and
  `lookup_bytes` (the host hash index) on the host, and, for an f-gram model of `layers` blocks
  and FFN width `ffn` (default the `scone` section's), `fgram_model_params`, the parameters
  trained alongside the model and then dropped (on the accelerator during training only), and
  `fgram_train_flops_per_token`: the training FLOPs (3 x forward) it adds per token, run on the
  window of K tokens ending at every position (matmuls and attention, as `arch_cost` counts).
  """
  w, k = scone.width, scone.max_n
  layers = scone.layers if layers is None else layers
  ffn = scone.ffn if ffn is None else ffn
  fcfg = dataclasses.replace(cfg, positions='learned')
  block = BLOCKS['transformer'].cost(fcfg, {'hidden': w, 'heads': scone.heads,
                                            'kv_groups': scone.heads,
                                            'head_dim': w // scone.heads, 'ffn': ffn})
  params = hidden * w + k * w + layers * block['params'] + w * hidden
  # Per window: its K slots through the input projection and the blocks (attention scores and
  # values over K keys: 2 K w per slot), the last slot through the output projection.
  macs = k * hidden * w + layers * k * (block['matmul_macs'] + 2 * k * w) + w * hidden
  return {'table_bytes': 4 * num_fgrams * hidden,
          'index_bytes': num_fgrams * (4 * k + 4 + 8),  # tokens, lengths, counts
          'lookup_bytes': num_fgrams * (8 + 4),  # in memory: sorted 64-bit hashes and their ids
          'fgram_model_params': int(params),
          'fgram_train_flops_per_token': 3.0 * 2.0 * macs}
