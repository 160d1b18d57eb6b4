"""Where the search's population evaluation runs: on the trainer's mesh, with its shardings.

The search reads the config's `mesh` section, as `train` does (`parallel.make_mesh`): the
supernet's variables lie as in training (`parallel.param_shardings`: FSDP over the hidden axis,
tensor parallelism over heads / FFN / vocabulary), the stacked validation batches [n, rows, ...]
and a proxy's minibatches [k, rows, ...] are split over the batch axes ('data', 'fsdp'), the
archs and the search state are replicated. Each population call gathers the supernet once over
'fsdp' (`parallel.gathered`, as a training step does), so every device computes its own rows; left
to itself XLA gathered the rows instead (every device computing every row's logits). Every device
(of every process) then takes part in each forward;
the same program runs on 1 CPU, 8 devices or a pod slice, and `elastic-jax compile` compiles it
(`abstract_data`) for a TPU topology.

Memory: a population forward holds float32 logits [archs, rows per device, seq_len, vocab] (a
masked-LM batch that names its predicted positions: [..., those, vocab]). They
are kept under `search.max_logits_mib` per device (`eval_plan`): archs vmapped together
(`search.chunk`; 0 = as many as fit) are capped at what fits, and when even one arch's logits of
a whole batch do not fit, each batch is run as strided micro-batches of fewer rows
(`evaluation._sums_population`'s `micro_batches`). The vocabulary is counted whole on every
device (an upper bound: XLA may keep the logits split over 'tensor').
"""

from __future__ import annotations

import dataclasses
import math

import jax

from elastic_jax import distributed, parallel
from elastic_jax.errors import UserError

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """How a population forward is cut to fit: `chunk` archs vmapped at a time, each validation
  batch as `micro_batches` strided micro-batches; `logits_bytes` of float32 logits per device at
  once (at most `bound_bytes`)."""

  chunk: int
  micro_batches: int
  rows_per_device: int  # rows of one micro-batch on one device
  logits_bytes: int
  bound_bytes: int


def search_mesh(cfg) -> jax.sharding.Mesh:
  """The mesh of the config's `mesh` section over every device of every process (training's)."""
  return parallel.make_mesh(cfg.get('mesh', {}))


def eval_plan(chunk: int, max_logits_mib: float, rows: int, seq_len: int, vocab: int,
              mesh: jax.sharding.Mesh) -> EvalPlan:
  """The plan for validation batches of `rows` rows whose logits are formed at `seq_len`
  positions each (every token; a masked-LM batch's `mlm_positions`), `vocab`-sized.

  `chunk`: the archs wanted per vmapped step (search.chunk; 0 = as many as the bound allows).
  Raises UserError when the mesh's batch axes do not divide the rows, or when the bound is below
  one sequence's logits."""
  ways = parallel.check_batch(rows, mesh, 'the validation batch')
  per_row = seq_len * vocab * 4
  bound = int(max_logits_mib * MIB)
  if per_row > bound:
    raise UserError(
        f'search.max_logits_mib={max_logits_mib:g} is below the float32 logits of one sequence '
        f'({seq_len} tokens x {vocab} vocabulary = {per_row / MIB:.2f} MiB); raise '
        f'search.max_logits_mib to at least {math.ceil(per_row / MIB)}')
  local = rows // ways
  # The fewest micro-batches (a divisor of the rows each device holds) whose logits fit.
  micro = next(m for m in range(1, local + 1) if local % m == 0 and local // m * per_row <= bound)
  rows_dev = local // micro
  fit = bound // (rows_dev * per_row)
  chunk = fit if chunk == 0 else min(int(chunk), fit)
  return EvalPlan(chunk=max(1, chunk), micro_batches=micro, rows_per_device=rows_dev,
                  logits_bytes=max(1, chunk) * rows_dev * per_row, bound_bytes=bound)


def data_shardings(data: dict, mesh: jax.sharding.Mesh) -> dict:
  """Shardings of the fitness data {'state', 'batches'[, 'extra']} (one per array; the state's
  stand for its NNX variables)."""
  stacked = parallel.microbatch_sharding(mesh)
  out = {'state': parallel.param_shardings(data['state'], mesh),
         # Stacked validation batches [n, rows, ...] lie like training's stacked micro-batches,
         # and so do the objectives' prepared minibatches (`Objective.prepare`: [k, rows, ...],
         # the first validation batches in their own format).
         'batches': {k: stacked for k in data['batches']}}
  if 'extra' in data:
    out['extra'] = jax.tree.map(lambda _: stacked, data['extra'])
  return out


def place(data: dict, mesh: jax.sharding.Mesh) -> dict:
  """Host fitness data (identical on every process) -> global arrays laid out on `mesh`."""
  shardings = data_shardings(data, mesh)
  return {k: distributed.put_global(v, shardings[k]) for k, v in data.items()}


def abstract_data(data: dict, mesh: jax.sharding.Mesh) -> dict:
  """Fitness data of shapes only (arrays or ShapeDtypeStructs) -> ShapeDtypeStructs carrying
  their shardings on `mesh` (what `elastic-jax compile` lowers with)."""
  shardings = data_shardings(data, mesh)
  return {k: parallel.with_shardings(v, shardings[k]) for k, v in data.items()}
