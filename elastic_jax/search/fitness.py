"""Fitness of genomes for the search job: a list of objective names as one jittable function.

`Fitness(space, names, model, batches)` turns names of the objective registry
(`search.objectives`) into `fitness(genomes_BxG, data) -> float32[B, M]`, every column minimised
(maximised objectives are negated), which is what the search strategies expect.

The supernet's weights and the batches are the `data` argument, never closed-over constants: a
jitted search loop takes them as arguments, so one compilation serves any weights of the same
shapes, and XLA does not embed millions of parameters as literals.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax import distributed, evaluation, parallel
from elastic_jax.errors import UserError
from elastic_jax.search.genomes import extreme_genomes
from elastic_jax.search.objectives import Context, Objective, check_not_empty, get_objective
from elastic_jax.space import Space


@dataclasses.dataclass(frozen=True)
class FitnessFn:
  """The jittable function `fn(genomes_BxG, data) -> float32[B, M]` (every column minimised).

  Holds no arrays: it is a static argument of jitted search loops. A frozen dataclass whose
  compared fields are everything the traced function depends on (the space's key, the
  objectives' full definitions, not just their names, the graphdef, the chunk), so two instances
  are equal exactly when they compute the same function: equal searches in one process share
  compiled loops, and a re-registered objective (other proxy settings) never reuses a stale one.
  The jit cache keeps no supernet alive. `traces` counts how often it was traced.
  """

  space: Space = dataclasses.field(compare=False, repr=False)
  names: tuple[str, ...]
  graphdef: Any
  chunk: int
  micro_batches: int = 1
  hidden_buckets: tuple[int, ...] = ()
  mesh: Any = None  # traced under parallel.mesh_context(mesh) (fused attention kernels read it)
  objectives: tuple[Objective, ...] = dataclasses.field(init=False)
  space_key: tuple = dataclasses.field(init=False, repr=False)
  _traces: list = dataclasses.field(init=False, compare=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, 'objectives', tuple(get_objective(n) for n in self.names))
    object.__setattr__(self, 'space_key', self.space.key())
    object.__setattr__(self, '_traces', [0])

  @property
  def traces(self) -> int:
    return self._traces[0]

  def metrics(self, genomes_BxG: jax.Array, data: Mapping | None,
              objectives: Sequence[Objective],
              active_B: jax.Array | None = None) -> dict[str, jax.Array]:
    """Natural-unit values {name: float32[B]} of any objectives (jittable); with `active_B`,
    values of the inactive genomes are not wanted (the population forward skips them)."""
    ctx = Context(self.space, jnp.asarray(genomes_BxG, jnp.int32), self.graphdef, data,
                  self.chunk, active_B, self.micro_batches, self.hidden_buckets, self.mesh)
    with parallel.mesh_context(self.mesh):
      return {o.name: jnp.asarray(o.fn(ctx), jnp.float32) for o in objectives}

  def __call__(self, genomes_BxG: jax.Array, data: Mapping | None,
               active_B: jax.Array | None = None) -> jax.Array:
    self._traces[0] += 1  # Python side effect: runs once per trace, never per compiled call
    values = self.metrics(genomes_BxG, data, self.objectives, active_B)
    columns = [-values[o.name] if o.maximize else values[o.name] for o in self.objectives]
    return jnp.stack(columns, axis=1)


EVAL_BLOCK = 8


@functools.partial(jax.jit, static_argnames=('fn', 'objectives'))
def _metrics_jit(genomes_BxG, data, *, fn: FitnessFn, objectives: tuple[Objective, ...]):
  return fn.metrics(genomes_BxG, data, objectives)


class Fitness:
  """The search's fitness for a list of objective names, and the data it is evaluated on.

  `self.fn(genomes_BxG, data) -> float32[B, M]` (minimised; see `FitnessFn`) is what jitted
  search loops call; `data` is `self.data` (the supernet's state and the stacked validation
  batches, always a jit *argument*) or any pytree of the same structure, e.g. the same
  supernet after more training. `self(genomes, data)` is the same as `self.fn(genomes, data)`.
  """

  def __init__(self, space: Space, objectives: Sequence[str], model: nnx.Module | None = None,
               batches: Sequence[Mapping] | Mapping | None = None, chunk: int = 1, *,
               micro_batches: int = 1, mesh=None, graphdef=None, data: Mapping | None = None,
               hidden_buckets: bool = False):
    """`mesh`: lay the supernet and batches out on it (`search/placement.py`; None: this
    process's default device) and trace the forward under it (`parallel.mesh_context`).
    `graphdef` and `data` instead of `model` and `batches`: data already built (e.g. shapes
    only, for `elastic-jax compile`). `hidden_buckets` (with chunk 1): each arch's forward runs
    on the supernet narrowed to its hidden choice (`evaluation._sums_population`)."""
    check_not_empty(objectives)
    if len(set(objectives)) != len(objectives):
      raise UserError(f'search.objectives lists an objective twice: {list(objectives)}')
    self.objectives = tuple(get_objective(n) for n in objectives)
    self.names = tuple(objectives)
    self.space = space
    if int(chunk) < 1:
      raise UserError(f'search.chunk must be >= 1, got {chunk}')
    self.data = data
    if model is not None:
      if batches is None:
        raise UserError('Fitness(model=...) also needs the validation batches')
      graphdef = nnx.graphdef(model)
      self.data = self.data_of(model, batches, mesh)
    missing = [o.name for o in self.objectives if o.needs_model and self.data is None]
    if missing:
      raise UserError(f'objective(s) {missing} need the supernet: pass model= and batches=')
    buckets = evaluation.bucket_widths(space.cfg.hidden, space.cfg.supernet_dims().hidden,
                                       int(chunk)) if hidden_buckets else ()
    self.fn = FitnessFn(space, self.names, graphdef, int(chunk), int(micro_batches), buckets,
                        mesh)

  def data_of(self, model: nnx.Module, batches: Sequence[Mapping] | Mapping, mesh=None) -> dict:
    """This fitness's data (see the class docstring) for `model` and validation `batches`: the
    supernet's state, the stacked batches and the objectives' prepared inputs, laid out on
    `mesh`. Other batches of the same count give data that runs the same compiled programs."""
    stacked = batches if isinstance(batches, Mapping) else evaluation.stack_batches(batches)
    data = {'state': nnx.state(model),
            'batches': {k: jnp.asarray(v) for k, v in stacked.items()}}
    extra = {o.name: o.prepare(self.space, model, batches) for o in self.objectives if o.prepare}
    if extra:
      data['extra'] = extra
    if mesh is not None:
      from elastic_jax.search import placement  # noqa: PLC0415
      data = placement.place(data, mesh)
    return data

  @property
  def maximize(self) -> tuple[bool, ...]:
    return tuple(o.maximize for o in self.objectives)

  @property
  def traces(self) -> int:
    return self.fn.traces

  def __call__(self, genomes_BxG: jax.Array, data: Mapping | None,
               active_B: jax.Array | None = None) -> jax.Array:
    return self.fn(genomes_BxG, data, active_B)

  def to_minimised(self, natural_NxM: np.ndarray) -> np.ndarray:
    sign = np.where(np.asarray(self.maximize), -1.0, 1.0)
    return np.asarray(natural_NxM, np.float64) * sign

  to_natural = to_minimised  # negation is its own inverse

  def evaluate(self, genomes_BxG, names: Sequence[str] | None = None,
               data: Mapping | None = None) -> dict[str, np.ndarray]:
    """Host convenience: natural values of `names` (default: the objectives) for genomes, on
    `self.data` or on `data` of the same structure (e.g. held-out batches placed alike).

    Runs in blocks of `EVAL_BLOCK` genomes (the last one padded), so every call, whatever its
    size, uses one compiled program per set of names and data shapes (shared by equal `Fitness`
    objects)."""
    data = self.data if data is None else data
    names = tuple(names or self.names)
    genomes = np.asarray(genomes_BxG, np.int32).reshape(-1, self.space.num_genes)
    b = genomes.shape[0]
    if b == 0:
      return {n: np.zeros(0, np.float32) for n in names}
    padded = -(-b // EVAL_BLOCK) * EVAL_BLOCK
    genomes = np.concatenate([genomes, np.repeat(genomes[:1], padded - b, axis=0)])
    # The objectives' definitions, not just their names, key the compiled program.
    objectives = tuple(get_objective(n) for n in names)
    outs = [_metrics_jit(jnp.asarray(genomes[i:i + EVAL_BLOCK]), data, fn=self.fn,
                         objectives=objectives) for i in range(0, padded, EVAL_BLOCK)]
    # On a mesh spanning processes every process runs this call; each reads the whole result.
    return {n: np.concatenate([distributed.to_host(o[n]) for o in outs])[:b] for n in names}

  def reference_point(self, overrides: Sequence[float] = (),
                      extremes: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Natural-unit hypervolume reference point (a worst value per objective).

    `overrides` (one value per objective) wins; else the objective's analytic `reference`; else
    the worse of `extremes[name]` (its values at the space's smallest and largest architectures,
    see `extreme_genome`) plus 10% of their gap (1% of the value when they are equal). NaN where
    none applies.
    """
    if overrides:
      if len(overrides) != len(self.names):
        raise UserError(f'search.ref_point has {len(overrides)} values, expected one per '
                        f'objective {list(self.names)}')
      return np.asarray(overrides, np.float64)
    out = []
    for o in self.objectives:
      if o.reference is not None:
        out.append(float(o.reference(self.space)))
      elif extremes is not None and o.name in extremes:
        v = np.asarray(extremes[o.name], np.float64)
        worst, gap = (v.min(), v.max() - v.min()) if o.maximize else (v.max(), v.max() - v.min())
        margin = 0.1 * gap if gap > 0 else 0.01 * max(abs(worst), 1e-6)
        out.append(worst - margin if o.maximize else worst + margin)
      else:
        out.append(np.nan)
    return np.asarray(out, np.float64)

  def extremes(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Values at the space's smallest and largest architectures (by parameters), natural."""
    return self.evaluate(extreme_genomes(self.space), names)
