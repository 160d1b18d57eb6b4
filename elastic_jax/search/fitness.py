"""Fitness of genomes for the search job: a registry of named objectives, one jittable function.

An objective is a name mapped to a jittable function of an evaluation `Context` (the genomes, their
decoded archs, the supernet's state and the fixed validation batches, all traced) returning
float32[B] in natural units, plus its direction. `Fitness(space, names, model, batches)` turns a
list of names into `fitness(genomes_BxG, data) -> float32[B, M]`, every column minimised
(maximised objectives are negated), which is what the search strategies expect.

The supernet's weights and the batches are the `data` argument, never closed-over constants: a
jitted search loop takes them as arguments, so one compilation serves any weights of the same
shapes, and XLA does not embed millions of parameters as literals. All loss-type objectives share
one population forward (`Context.sums`): the whole population in one `lax.map` over archs (chunk 1:
one arch at a time, so `lax.switch`/`lax.cond` skip removed layers and FFN blocks; chunk > 1: vmap
`chunk` archs together).

New objectives (e.g. zero-cost proxies from `elastic_jax.proxies`) plug in with
`register_objective(Objective('wpca', fn, maximize=True, needs_model=True))`, where `fn(ctx)` may
use `ctx.model` (the merged supernet), `ctx.archs`, `ctx.batches` (stacked, leading batch axis) and
`ctx.first_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elastic_jax import evaluation
from elastic_jax.config import BLOCK_TYPES, FLEXIBERT_BLOCKS
from elastic_jax.errors import UserError
from elastic_jax.space import GLOBAL_GENES, LAYER_GENES, Space


class Context:
  """What an objective function sees while the fitness is traced (all arrays are tracers).

  Costs and the population forward are computed lazily and at most once per trace, so any number
  of loss-type objectives cost one forward pass of the population.
  """

  def __init__(self, space: Space, genomes_BxG: jax.Array, graphdef, data: Mapping | None,
               chunk: int):
    self.space = space
    self.genomes = genomes_BxG
    self.graphdef = graphdef
    self.data = data
    self.chunk = chunk

  @functools.cached_property
  def archs(self):
    return jax.vmap(self.space.decode)(self.genomes)

  @functools.cached_property
  def cost(self) -> dict:
    """The analytic costs (`cost.arch_cost`) of every arch, each float/int[B]."""
    return jax.vmap(self.space.cost)(self.archs)

  def _need_model(self, what: str) -> None:
    if self.graphdef is None or self.data is None:
      raise UserError(f'objective {what!r} needs the supernet and validation batches; build '
                      'Fitness with model= and batches=')

  @property
  def model(self) -> nnx.Module:
    self._need_model('model')
    return nnx.merge(self.graphdef, self.data['state'])

  @property
  def batches(self) -> dict:
    """The fixed validation batches, stacked: every leaf has a leading batch-index axis."""
    self._need_model('batches')
    return self.data['batches']

  def extra(self, name: str):
    """What objective `name`'s `prepare` made (see `Objective.prepare`)."""
    extra = (self.data or {}).get('extra', {})
    if name not in extra:
      raise UserError(f'objective {name!r} needs data prepared when the Fitness is built: list '
                      'it in search.objectives')
    return extra[name]

  @property
  def first_batch(self) -> dict:
    return jax.tree.map(lambda x: x[0], self.batches)

  @functools.cached_property
  def sums(self) -> jax.Array:
    """float32[B, 3]: (loss sum, token weight sum, correct count) over all validation batches."""
    self._need_model('loss')
    if 'targets' not in self.data['batches']:
      raise UserError('loss-type objectives need a language-modelling task (data.task causal_lm '
                      "or mlm); use cost objectives such as 'params' or a proxy for others")
    population = self.genomes.shape[0]
    return evaluation._sums_population(self.graphdef, self.data['state'], self.archs,
                                       self.data['batches'], max(1, min(self.chunk, population)))

  @property
  def loss(self) -> jax.Array:
    return self.sums[:, 0] / jnp.maximum(self.sums[:, 1], 1.0)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A named fitness component.

  Attributes:
    name: registry key, used in configs (`search.objectives`) and reports.
    fn: jittable `fn(ctx: Context) -> float[B]` in natural units.
    maximize: True when larger is better; the search minimises the negated value.
    needs_model: whether `fn` uses the supernet / batches (False: analytic, model-free).
    reference: `reference(space) -> float`, a worst value in natural units used as the
      hypervolume reference point; None means "from the space's smallest and largest
      architectures": the worse of their two values plus 10% of the gap (`reference_point`).
    description: one line for reports and error messages.
    unit_scale: reports divide by this (1e6 for parameters, ...).
    unit: the unit label after scaling.
    prepare: optional `prepare(space, model, batches) -> pytree` run once on the host when a
      `Fitness` is built; its result travels with the supernet's state as a jit argument and
      `fn` reads it as `ctx.extra(name)` (e.g. a proxy's own minibatch format).
  """

  name: str
  fn: Callable[[Context], jax.Array]
  maximize: bool = False
  needs_model: bool = False
  reference: Callable[[Space], float] | None = None
  description: str = ''
  unit_scale: float = 1.0
  unit: str = ''
  prepare: Callable[[Space, nnx.Module, Sequence[Mapping] | Mapping], Any] | None = None


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective, *, overwrite: bool = False) -> Objective:
  """Adds an objective to the registry (`overwrite` to replace one of the same name)."""
  if objective.name in OBJECTIVES and not overwrite:
    raise ValueError(f'objective {objective.name!r} is already registered')
  OBJECTIVES[objective.name] = objective
  return objective


@dataclasses.dataclass(frozen=True)
class _ProxyFn:
  """A proxy objective's `fn`, equal to another exactly when it computes the same values (same
  proxy, same `proxy` settings): compiled programs are shared by equal settings only."""

  name: str
  cfg: Any  # proxies.ProxyConfig (a frozen dataclass)

  def __call__(self, ctx: Context) -> jax.Array:
    from elastic_jax.proxies import score as proxy_score  # noqa: PLC0415
    params = ctx.cost['params'].astype(jnp.float32)
    measures = proxy_score._measures((self.name,))
    if not measures:
      return params
    values = proxy_score._population(ctx.graphdef, ctx.data['state'], ctx.archs,
                                     ctx.extra(self.name), cfg=self.cfg, measures=measures,
                                     widths=proxy_score.pca_widths(ctx.space, self.cfg))
    return proxy_score._assemble((self.name,), measures, values, params)[self.name]


@dataclasses.dataclass(frozen=True)
class _ProxyPrepare:
  """A proxy objective's `prepare`: its minibatches in the proxy's own format."""

  name: str
  cfg: Any

  def __call__(self, space, model, batches):
    from elastic_jax.proxies import score as proxy_score  # noqa: PLC0415
    del model
    return proxy_score.prepare_batches(batches, self.cfg, space.model.causal, (self.name,))


def proxy_objective(name: str, proxy_cfg=None) -> Objective:
  """A zero-cost proxy of `elastic_jax.proxies` as an objective (`proxy_cfg`: the `proxy` config
  section; None = its defaults): maximised (every proxy is oriented so that higher predicts a
  better network), computed for the whole population inside the fitness's compiled call, with
  the supernet's state as an argument. Uses the proxies package's population core. Objectives
  made from equal settings are equal (and share compiled programs); others are not.
  """
  from elastic_jax import proxies  # noqa: PLC0415

  cfg = proxies.proxy_config(proxy_cfg)
  return Objective(name, _ProxyFn(name, cfg), maximize=True, needs_model=True,
                   prepare=_ProxyPrepare(name, cfg),
                   description=f'zero-cost proxy {name} (elastic_jax.proxies, maximised)')


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    from elastic_jax.proxies import PROXIES  # noqa: PLC0415
    if name in PROXIES and name != 'params':
      return register_objective(proxy_objective(name))
    raise UserError(f'unknown objective {name!r}; known objectives: {", ".join(sorted(OBJECTIVES))}'
                    ' (register more with elastic_jax.search.fitness.register_objective)')
  return OBJECTIVES[name]


# Analytic costs: name -> key of `cost.arch_cost`.
COST_KEYS = {
    'params': 'params',
    'flops': 'flops_per_token',
    'train_flops': 'train_flops_per_token',
    'kv_cache': 'kv_cache_bytes_per_token',
    'activation_memory': 'activation_bytes_per_token',
    'param_bytes': 'param_bytes',
}
_COST_INFO = {
    'params': ('parameters', 1e6, 'M'),
    'flops': ('forward FLOPs per token', 1e6, 'MFLOP/token'),
    'train_flops': ('training FLOPs per token (3 x forward)', 1e6, 'MFLOP/token'),
    'kv_cache': ('KV-cache bytes per token', 1e3, 'kB/token'),
    'activation_memory': ('activation bytes per token kept for backward (estimate)', 1e3,
                          'kB/token'),
    'param_bytes': ('parameter bytes', 1e6, 'MB'),
}


def _cost_fn(key: str) -> Callable[[Context], jax.Array]:
  return lambda ctx: ctx.cost[key].astype(jnp.float32)


_COST_FNS: dict[tuple, Callable] = {}


def space_key(space: Space) -> tuple:
  """What a space's functions depend on (hashable)."""
  return (space.model, space.cfg, space.seq_len)


def genome_costs(space: Space, genomes_BxG) -> dict[str, np.ndarray]:
  """Host convenience: the analytic costs of genomes (one compile per space, cached)."""
  fn = _COST_FNS.get(space_key(space))
  if fn is None:
    fn = jax.jit(jax.vmap(lambda g: space.cost(space.decode(g))))
    _COST_FNS[space_key(space)] = fn
  return {k: np.asarray(v) for k, v in fn(jnp.asarray(genomes_BxG, jnp.int32)).items()}


def extreme_genome(space: Space, name: str, largest: bool) -> np.ndarray:
  """The genome of the exact min (max) of an analytic cost over the space.

  Every cost is a sum over layers plus global terms, and grows with every numeric choice; so the
  extreme takes every numeric gene at its smallest (largest) choice and, layer by layer, the block
  type with the smallest (largest) cost (greedy is exact for a sum of independent layer terms).
  All trials of one layer are costed in one batched call.
  """
  key = COST_KEYS[name]
  sizes = np.asarray(space.gene_sizes)
  genome = (sizes - 1) if largest else np.zeros_like(sizes)
  for layer in range(space.num_layers):
    gene = GLOBAL_GENES + layer * LAYER_GENES
    trials = np.repeat(genome[None], int(sizes[gene]), axis=0)
    trials[:, gene] = np.arange(int(sizes[gene]))
    values = genome_costs(space, trials)[key].astype(np.float64)
    genome[gene] = int(np.argmax(values) if largest else np.argmin(values))
  return genome.astype(np.int32)


def extreme_value(space: Space, name: str, largest: bool) -> float:
  """Exact min (max) of an analytic cost over the space (see `extreme_genome`)."""
  genome = extreme_genome(space, name, largest)
  return float(genome_costs(space, genome[None])[COST_KEYS[name]][0])


def canonical_genomes(space: Space, genomes_BxG: jax.Array) -> jax.Array:
  """One genome per architecture (jittable): genes that do not change the computed network are
  zeroed, so equal architectures get equal genomes.

  The encoding is redundant: a layer beyond `depth` ignores all its genes, a 'skip' layer all but
  its block gene, a non-bottleneck layer its `inner` gene, and a kv gene maps to the divisor of
  the layer's heads that `Space.decode` picks. Exact duplicate rejection on raw genomes misses
  these clones; the search job compares canonical genomes instead.
  """
  genomes_BxG = jnp.asarray(genomes_BxG, jnp.int32)
  archs = jax.vmap(space.decode)(genomes_BxG)
  enc_BxG = jax.vmap(space.encode)(archs)  # re-encoding maps kv choices to the decoded divisor
  b = enc_BxG.shape[0]
  end = GLOBAL_GENES + space.num_layers * LAYER_GENES
  per_BxLxK = enc_BxG[:, GLOBAL_GENES:end].reshape(b, space.num_layers, LAYER_GENES)
  within_BxL = jnp.arange(space.num_layers)[None, :] < archs.depth[:, None]
  on_BxL = archs.layer_on()
  bottleneck_BxL = archs.block == BLOCK_TYPES.index('bottleneck')
  keep_BxLxK = jnp.stack([within_BxL, on_BxL, on_BxL, on_BxL, on_BxL & bottleneck_BxL], axis=-1)
  per_BxLxK = jnp.where(keep_BxLxK, per_BxLxK, 0)
  parts = [enc_BxG[:, :GLOBAL_GENES], per_BxLxK.reshape(b, -1)]
  if space.ffn_layer_genes:  # stacked-FFN genes count only in FlexiBERT layers that are on
    flexi_BxL = jnp.isin(archs.block, jnp.asarray([BLOCK_TYPES.index(k)
                                                   for k in FLEXIBERT_BLOCKS]))
    parts.append(jnp.where(on_BxL & flexi_BxL, enc_BxG[:, end:], 0))
  return jnp.concatenate(parts, axis=1)


def _register_builtins() -> None:
  for name, key in COST_KEYS.items():
    description, scale, unit = _COST_INFO[name]
    register_objective(Objective(
        name, _cost_fn(key), reference=functools.partial(
            lambda space, n: 1.1 * extreme_value(space, n, largest=True), n=name),
        description=description, unit_scale=scale, unit=unit))
  # Loss-type objectives take their reference from the smallest / largest architectures: ln(V),
  # the loss of a uniform predictor, is so far above a trained supernet's losses that the
  # hypervolume would measure almost only the parameter axis.
  register_objective(Objective(
      'loss', lambda ctx: ctx.loss, needs_model=True, unit='nats/token',
      description='validation cross-entropy (nats/token), inherited supernet weights'))
  register_objective(Objective(
      'perplexity', lambda ctx: jnp.exp(ctx.loss), needs_model=True,
      description='validation perplexity, inherited supernet weights'))
  register_objective(Objective(
      'accuracy', lambda ctx: ctx.sums[:, 2] / jnp.maximum(ctx.sums[:, 1], 1.0),
      maximize=True, needs_model=True, reference=lambda space: 0.0,
      description='validation token accuracy (maximised), inherited supernet weights'))


_register_builtins()

# What the final report computes for every front member (besides the searched objectives).
REPORT_METRICS = ('loss', 'perplexity', 'accuracy', 'params', 'flops', 'kv_cache',
                  'activation_memory')


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
  objectives: tuple[Objective, ...] = dataclasses.field(init=False)
  space_key: tuple = dataclasses.field(init=False, repr=False)
  _traces: list = dataclasses.field(init=False, compare=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, 'objectives', tuple(get_objective(n) for n in self.names))
    object.__setattr__(self, 'space_key', space_key(self.space))
    object.__setattr__(self, '_traces', [0])

  @property
  def traces(self) -> int:
    return self._traces[0]

  def metrics(self, genomes_BxG: jax.Array, data: Mapping | None,
              objectives: Sequence[Objective]) -> dict[str, jax.Array]:
    """Natural-unit values {name: float32[B]} of any objectives (jittable)."""
    ctx = Context(self.space, jnp.asarray(genomes_BxG, jnp.int32), self.graphdef, data,
                  self.chunk)
    return {o.name: jnp.asarray(o.fn(ctx), jnp.float32) for o in objectives}

  def __call__(self, genomes_BxG: jax.Array, data: Mapping | None) -> jax.Array:
    self._traces[0] += 1  # Python side effect: runs once per trace, never per compiled call
    values = self.metrics(genomes_BxG, data, self.objectives)
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
               batches: Sequence[Mapping] | Mapping | None = None, chunk: int = 1):
    if not objectives:
      raise UserError('search.objectives is empty; name at least one, e.g. ("loss", "params")')
    if len(set(objectives)) != len(objectives):
      raise UserError(f'search.objectives lists an objective twice: {list(objectives)}')
    self.objectives = tuple(get_objective(n) for n in objectives)
    self.names = tuple(objectives)
    self.space = space
    if int(chunk) < 1:
      raise UserError(f'search.chunk must be >= 1, got {chunk}')
    graphdef, self.data = None, None
    if model is not None:
      graphdef, state = nnx.split(model)
      if batches is None:
        raise UserError('Fitness(model=...) also needs the validation batches')
      stacked = batches if isinstance(batches, Mapping) else evaluation.stack_batches(batches)
      self.data = {'state': state, 'batches': {k: jnp.asarray(v) for k, v in stacked.items()}}
      extra = {o.name: o.prepare(space, model, batches) for o in self.objectives if o.prepare}
      if extra:
        self.data['extra'] = extra
    missing = [o.name for o in self.objectives if o.needs_model and self.data is None]
    if missing:
      raise UserError(f'objective(s) {missing} need the supernet: pass model= and batches=')
    self.fn = FitnessFn(space, self.names, graphdef, int(chunk))

  @property
  def maximize(self) -> tuple[bool, ...]:
    return tuple(o.maximize for o in self.objectives)

  @property
  def traces(self) -> int:
    return self.fn.traces

  def __call__(self, genomes_BxG: jax.Array, data: Mapping | None) -> jax.Array:
    return self.fn(genomes_BxG, data)

  def to_minimised(self, natural_NxM: np.ndarray) -> np.ndarray:
    sign = np.where(np.asarray(self.maximize), -1.0, 1.0)
    return np.asarray(natural_NxM, np.float64) * sign

  to_natural = to_minimised  # negation is its own inverse

  def evaluate(self, genomes_BxG, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Host convenience: natural values of `names` (default: the objectives) for genomes.

    Runs in blocks of `EVAL_BLOCK` genomes (the last one padded), so every call, whatever its
    size, uses one compiled program per set of names (shared by equal `Fitness` objects)."""
    names = tuple(names or self.names)
    genomes = np.asarray(genomes_BxG, np.int32).reshape(-1, self.space.num_genes)
    b = genomes.shape[0]
    if b == 0:
      return {n: np.zeros(0, np.float32) for n in names}
    padded = -(-b // EVAL_BLOCK) * EVAL_BLOCK
    genomes = np.concatenate([genomes, np.repeat(genomes[:1], padded - b, axis=0)])
    # The objectives' definitions, not just their names, key the compiled program.
    objectives = tuple(get_objective(n) for n in names)
    outs = [_metrics_jit(jnp.asarray(genomes[i:i + EVAL_BLOCK]), self.data, fn=self.fn,
                         objectives=objectives) for i in range(0, padded, EVAL_BLOCK)]
    return {n: np.concatenate([np.asarray(o[n]) for o in outs])[:b] for n in names}

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
    genomes = np.stack([extreme_genome(self.space, 'params', largest=False),
                        extreme_genome(self.space, 'params', largest=True)])
    return self.evaluate(genomes, names)


@dataclasses.dataclass(frozen=True, init=False)
class Budgets:
  """Constraint `feasible(genomes_BxG) -> bool[B]` from analytic cost budgets (jittable).

  `budgets` maps cost names (`COST_KEYS`: params, flops, kv_cache, ...) to upper bounds; a value
  of 0 or None means no budget. A frozen dataclass equal by value (the space's key and the
  budgets), so jitted loops are shared between runs.
  """

  space: Space = dataclasses.field(compare=False, repr=False)
  budgets: tuple[tuple[str, float], ...]
  space_key: tuple = dataclasses.field(repr=False)

  def __init__(self, space: Space, budgets: Mapping[str, float | None]):
    unknown = sorted(set(budgets) - set(COST_KEYS))
    if unknown:
      raise UserError(f'search.budgets.{unknown[0]} is not a budgetable cost; use one of '
                      f'{", ".join(COST_KEYS)}')
    object.__setattr__(self, 'space', space)
    object.__setattr__(self, 'budgets',
                       tuple(sorted((k, float(v)) for k, v in budgets.items() if v)))
    object.__setattr__(self, 'space_key', space_key(space))

  def __bool__(self):
    return bool(self.budgets)

  def __call__(self, genomes_BxG: jax.Array) -> jax.Array:
    cost = jax.vmap(lambda g: self.space.cost(self.space.decode(g)))(genomes_BxG)
    ok = jnp.ones(genomes_BxG.shape[:1], bool)
    for name, bound in self.budgets:
      ok &= cost[COST_KEYS[name]].astype(jnp.float32) <= jnp.float32(bound)
    return ok

  def check(self, sample: int = 4096, seed: int = 0) -> float:
    """Raises UserError unless some architecture meets every budget; returns the feasible share
    of uniform random genomes (a small share makes the search's rejection sampling slow)."""
    for name, bound in self.budgets:
      lowest = extreme_value(self.space, name, largest=False)
      if lowest > bound:
        description, scale, unit = _COST_INFO[name]
        raise UserError(
            f'search.budgets.{name}={bound:,.6g} is below the smallest achievable value in this '
            f'search space: {lowest:,.6g} {description} ({lowest / scale:.4g} {unit}); raise '
            'the budget')
    if not self.budgets:
      return 1.0
    genomes = self.space.random_genomes(jax.random.key(seed), sample)
    share = float(np.mean(np.asarray(jax.jit(self.__call__)(genomes))))
    if share == 0.0:
      # Each budget alone is achievable; check the all-smallest architectures jointly.
      extremes = [self.space.encode(self.space.smallest())]
      if not bool(np.any(np.asarray(self(jnp.stack(extremes))))):
        raise UserError(f'no architecture meets all of search.budgets {dict(self.budgets)} '
                        'together (each alone is achievable); raise one of them')
    return share
