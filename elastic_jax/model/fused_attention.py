"""Fused softmax attention: the TPU Pallas splash-attention kernel, so the [B, N, T, S] scores
never reach HBM (`model.attention='splash'`).

`layers.grouped_attention` is the reference: it computes the logits as a matmul, writes them (and
the probabilities) to memory and reads them back, HBM traffic that grows with the square of the
sequence length (bench/results/aot.md has the steps before and after). The splash kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`) walks key blocks with an online softmax in
on-chip memory, skips blocks the causal mask rules out, and recomputes the probabilities in its
backward kernel. Masks it supports are what the model builds from a batch: segment ids
(attention stays within a segment; padding is its own segment) and, for decoders, causality.
An explicit `attn_mask` (a KV cache's) goes through the reference.

Sharding: a Pallas call is opaque to XLA's SPMD partitioner, so on a mesh (the context mesh of
`parallel.mesh_context`, under which the trainer's step, `elastic-jax compile`'s programs and the
search's fitness are traced) the kernel runs per shard under `jax.shard_map`: the batch over the
batch axes and heads over 'tensor' where they divide, the way the rest of the layer's activations
lie.

'splash' runs the kernel in programs for TPU (`uses_kernel`), the reference elsewhere, so a
config or an exported model that names it runs on any backend. `interpret=True`
('splash_interpret') runs the same kernel in the Pallas interpreter, on any backend: how the CPU
tests check it against the reference.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from elastic_jax.errors import UserError
from elastic_jax.parallel import BATCH_AXES, target_platform

# Sequence tiles the kernel walks, largest first; the sequence length must be a multiple of one.
_BLOCKS = (512, 256, 128)


def _tile(t: int) -> int | None:
  """The largest tile that divides `t`, or None."""
  return next((block for block in _BLOCKS if t % block == 0), None)


def uses_kernel(kind: str, t: int) -> bool:
  """Whether `model.attention=kind` runs the kernel on length-`t` sequences in the program being
  traced (a length no tile divides goes through the reference)."""
  if _tile(t) is None:
    return False
  return kind == 'splash_interpret' or (kind == 'splash' and target_platform() == 'tpu')


def check_length(t: int) -> int:
  """The kernel's tile for sequences of length `t`, or a UserError saying how to fix it."""
  block = _tile(t)
  if block is not None:
    return block
  raise UserError(f"model.attention='splash' needs a sequence length that is a multiple of "
                  f"{_BLOCKS[-1]}, got {t}: pad the batches (data.seq_len) or set "
                  f"model.attention='einsum'")


@functools.lru_cache(maxsize=64)
def _kernel(t: int, heads: int, causal: bool, mqa: bool, interpret: bool):
  """The splash kernel for one sequence: [heads, T, H] queries against [heads, T, H] keys and
  values (`mqa`: one [T, H] key/value head read by every query head)."""
  block = check_length(t)
  one = splash_mask.CausalMask((t, t)) if causal else splash_mask.FullMask((t, t))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            use_fused_bwd_kernel=True)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  # The kernel keeps its mask's block tables as arrays: made concrete even when first asked for
  # inside a trace, so the cached kernel holds constants, not a trace's values.
  with jax.ensure_compile_time_eval():
    return make(splash_mask.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, interpret=interpret)


def _local(q_BTNH, k_BTGH, v_BTGH, segments_BT, causal: bool, interpret: bool):
  """The kernel on the arrays one device holds."""
  b, t, n, h = q_BTNH.shape
  g = k_BTGH.shape[2]
  ids = splash.SegmentIds(q=segments_BT, kv=segments_BT)
  q_BNTH = q_BTNH.transpose(0, 2, 1, 3)
  k_BGTH, v_BGTH = k_BTGH.transpose(0, 2, 1, 3), v_BTGH.transpose(0, 2, 1, 3)
  if g == n:
    kernel = _kernel(t, n, causal, False, interpret)
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BGTH, v_BGTH, segment_ids=ids)
  else:  # each group's query heads against its one key/value head
    kernel = _kernel(t, n // g, causal, True, interpret)
    per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    q_BGRTH = q_BNTH.reshape(b, g, n // g, t, h)
    out_BNTH = jax.vmap(per_group)(q_BGRTH, k_BGTH, v_BGTH, ids).reshape(b, n, t, h)
  return out_BNTH.transpose(0, 2, 1, 3)


def splash_attention(q_BTNH, k_BTGH, v_BTGH, segments_BT, *, causal: bool,
                     interpret: bool = False):
  """softmax(q k^T + mask) v for N query heads over G key/value groups (query head n reads group
  n // (N / G)), the mask from `segments_BT` (query t may read key s iff their segment ids are
  equal, and s <= t when `causal`). Queries come scaled. Returns the context [B, T, N, H]."""
  run = functools.partial(_local, causal=causal, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q_BTNH, k_BTGH, v_BTGH, segments_BT)
  rows = [a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1]
  if q_BTNH.shape[0] % math.prod(mesh.shape[a] for a in rows):
    rows = []  # a batch the batch axes do not divide stays whole on every device
  tensor = mesh.shape.get('tensor', 1)
  heads = 'tensor' if tensor > 1 and not (q_BTNH.shape[2] % tensor or k_BTGH.shape[2] % tensor) \
      else None
  rows_spec = tuple(rows) or None
  spec = PartitionSpec(rows_spec, None, heads, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(rows_spec, None)),
                       out_specs=spec, check_vma=False)(q_BTNH, k_BTGH, v_BTGH, segments_BT)
