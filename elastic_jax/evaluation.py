"""Validation loss of sub-networks: one arch, or a whole population in one compiled call.

The supernet's state is an argument of the jitted functions (never a closed-over constant), and
the arch is int32 data, so one compilation serves every arch and every population of a given size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax import export, parallel
from elastic_jax.losses import at_predictions, token_accuracy, token_cross_entropy

# The last four: SCONE's f-gram inputs (elastic_jax/scone), present only when it is enabled.
MODEL_INPUTS = ('tokens', 'positions', 'segment_ids', 'token_types', 'fgram_hits', 'fgram_limit',
                'fgram_ids', 'fgram_emb')
# What the losses read besides the model's output (`mlm_positions`: a masked-LM batch's predicted
# positions, with data.mlm_max_predictions).
LOSS_INPUTS = ('targets', 'weights', 'mlm_positions')


def model_inputs(batch):
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def batch_sums(model: nnx.Module, batch, arch=None) -> jax.Array:
  """[loss sum, weight sum, correct count] of one batch (logits at its predicted positions
  only, where a masked-LM batch names them: `losses.at_predictions`)."""
  take, targets, weights = at_predictions(batch)  # take: the identity without mlm_positions
  logits = model.project(take(model.pre_logits(model_inputs(batch), arch)[0]))
  loss, weight = token_cross_entropy(logits, targets, weights)
  correct = token_accuracy(logits, targets, weights)
  return jnp.stack([loss, weight, correct])


def stack_batches(batches: Sequence[dict]) -> dict:
  """Fixed evaluation batches as one pytree with a leading batch-index axis (for lax.scan)."""
  return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


@functools.partial(jax.jit, static_argnums=0)
def _sums_one(graphdef, state, arch, stacked):
  model = nnx.merge(graphdef, state)
  def body(total, batch):
    return total + batch_sums(model, batch, arch), None
  total, _ = jax.lax.scan(body, jnp.zeros(3), stacked)
  return total


def bucket_widths(hidden_sizes, full: int, chunk: int = 1) -> tuple[int, ...]:
  """The widths a population forward narrows the supernet to (`_sums_population`'s
  `hidden_buckets`): the distinct hidden sizes given, each at most the supernet's `full` width,
  and `full` itself; () where narrowing cannot apply (chunk > 1: vmapped archs share one width)
  or buys nothing (the full width alone)."""
  widths = tuple(sorted({min(int(h), full) for h in hidden_sizes} | {int(full)}))
  return () if chunk > 1 or len(widths) == 1 else widths


@functools.partial(jax.jit, static_argnums=(0, 4),
                   static_argnames=('micro_batches', 'hidden_buckets', 'mesh'))
def _sums_population(graphdef, state, archs, stacked, chunk, active_P=None, *,
                     micro_batches: int = 1, hidden_buckets: tuple[int, ...] = (), mesh=None):
  """float32[P, 3] sums of every arch; `active_P` (bool[P], optional): archs whose sums are
  wanted; the others give zeros, and with chunk 1 their forward is skipped (a `cond`).

  `hidden_buckets` (ascending widths, chunk 1 only): each arch runs on the supernet narrowed to
  the smallest bucket >= its hidden size (`export.narrow`, a `lax.switch` branch per bucket), so
  its matmuls, norms and logits are that narrow instead of the supernet's full width. Exact: the
  hidden mask is a prefix. Costs one compiled branch per bucket.

  `micro_batches` = m > 1 runs each validation batch of R rows as m strided micro-batches of
  R / m rows (rows m*i + j form micro-batch j), one after another: the same sums with 1/m of the
  logits alive at once. Strided, so that on a mesh whose batch axes split the R rows in
  contiguous blocks every device keeps its own rows (no data moves between devices).

  `mesh`: the mesh `state` and `stacked` lie on; with FSDP, the parameters are gathered once per
  call and every device computes its own rows (`parallel.gathered`).
  """
  model = nnx.merge(graphdef, parallel.gathered(state, mesh))

  def batch_total(model, arch, batch):
    if micro_batches == 1:
      return batch_sums(model, batch, arch)
    rows = batch['tokens'].shape[0]
    split = {k: v.reshape(rows // micro_batches, micro_batches, *v.shape[1:])
             for k, v in batch.items()}
    def micro(total, j):
      part = {k: jax.lax.dynamic_index_in_dim(v, j, axis=1, keepdims=False)
              for k, v in split.items()}
      return total + batch_sums(model, part, arch), None
    return jax.lax.scan(micro, jnp.zeros(3), jnp.arange(micro_batches))[0]

  def on(model, arch):
    def body(total, batch):
      return total + batch_total(model, arch, batch), None
    return jax.lax.scan(body, jnp.zeros(3), stacked)[0]

  widths = bucket_widths(hidden_buckets, model.dims.hidden, chunk)
  if widths:
    branches = [functools.partial(lambda w, arch: on(export.narrow(model, w), arch), w)
                for w in widths]
    one = lambda arch: jax.lax.switch(
        jnp.searchsorted(jnp.asarray(widths), arch.hidden), branches, arch)
  else:
    one = functools.partial(on, model)
  if active_P is not None:
    run = one
    one = lambda xs: jax.lax.cond(xs[1], run, lambda _: jnp.zeros(3), xs[0])
    archs = (archs, jnp.asarray(active_P, bool))
  # chunk == 1: a scan over archs, so lax.switch / lax.cond inside the model skip removed layers
  # and FFN blocks. chunk > 1: vmaps `chunk` archs at a time (conds become selects).
  return jax.lax.map(one, archs, batch_size=chunk if chunk > 1 else None)


def _summarise(sums: np.ndarray) -> dict:
  loss = sums[..., 0] / np.maximum(sums[..., 1], 1.0)
  return {'loss': loss, 'perplexity': np.exp(loss), 'accuracy': sums[..., 2] /
          np.maximum(sums[..., 1], 1.0), 'tokens': sums[..., 1]}


def evaluate(model: nnx.Module, batches: Sequence[dict], arch=None) -> dict:
  """Mean validation loss, perplexity and token accuracy of one arch (or of a dense model)."""
  graphdef, state = nnx.split(model)
  sums = np.asarray(_sums_one(graphdef, state, arch, stack_batches(batches)))
  return {k: float(v) for k, v in _summarise(sums).items()}


def evaluate_population(model: nnx.Module, batches: Sequence[dict] | dict, archs,
                        chunk: int = 1, hidden_buckets: Sequence[int] | str = 'auto') -> dict:
  """Per-arch validation loss of a batched Arch [P, ...], one compiled call.

  `chunk` 1 (the default) runs the archs one at a time inside the call, skipping removed layers
  and FFN blocks: the fastest on a CPU (bench/bench_peers.py). `chunk` k > 1 vmaps k archs at a
  time, every layer at full size (fuller accelerators, k times the activations).
  `hidden_buckets` (with chunk 1): run each arch on the supernet narrowed to the smallest of these
  widths that holds its hidden size (`_sums_population`); 'auto' = the archs' own distinct hidden
  sizes (one compiled branch each); () = the supernet's full width. Same losses either way."""
  graphdef, state = nnx.split(model)
  stacked = batches if isinstance(batches, dict) else stack_batches(batches)
  population = archs.hidden.shape[0]
  if isinstance(hidden_buckets, str):
    if hidden_buckets != 'auto':
      raise ValueError(f"hidden_buckets must be 'auto' or a list of widths, got {hidden_buckets!r}")
    hidden_buckets = np.asarray(archs.hidden).reshape(-1).tolist()
  widths = bucket_widths(hidden_buckets, model.dims.hidden, chunk)
  sums = np.asarray(_sums_population(graphdef, state, archs, stacked, min(chunk, population),
                                     hidden_buckets=widths))
  return _summarise(sums)
