"""The registry of named search objectives.

An objective is a name mapped to a jittable function of an evaluation `Context` (the genomes, their
decoded archs, the supernet's state and the fixed validation batches, all traced) returning
float32[B] in natural units, plus its direction. Built in: the analytic costs (`genomes.COST_KEYS`)
and the validation loss, perplexity and accuracy, which share one population forward
(`Context.sums`): the whole population in one `lax.map` over archs (chunk 1: one arch at a time, so
`lax.switch`/`lax.cond` skip removed layers and FFN blocks; chunk > 1: vmap `chunk` archs
together). Zero-cost proxies come from `proxy_objective`.

New objectives plug in with `register_objective(Objective('speed', fn, needs_model=True))`, where
`fn(ctx)` may use `ctx.model` (the merged supernet), `ctx.archs`, `ctx.batches` (stacked, leading
batch axis) and `ctx.first_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from elastic_jax import evaluation
from elastic_jax.errors import UserError
from elastic_jax.search.genomes import COST_INFO, COST_KEYS, extreme_value
from elastic_jax.space import Space


class Context:
  """What an objective function sees while the fitness is traced (all arrays are tracers).

  Costs and the population forward are computed lazily and at most once per trace, so any number
  of loss-type objectives cost one forward pass of the population.
  """

  def __init__(self, space: Space, genomes_BxG: jax.Array, graphdef, data: Mapping | None,
               chunk: int, active_B: jax.Array | None = None, micro_batches: int = 1,
               hidden_buckets: tuple[int, ...] = (), mesh=None):
    self.space = space
    self.genomes = genomes_BxG
    self.active = active_B  # bool[B] or None: genomes whose values are read (others may be 0)
    self.graphdef = graphdef
    self.data = data
    self.chunk = chunk
    self.micro_batches = micro_batches  # each validation batch as this many micro-batches
    self.hidden_buckets = hidden_buckets  # widths the population forward narrows the supernet to
    self.mesh = mesh  # where the supernet and batches lie (None: one device)

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
                                       self.data['batches'], max(1, min(self.chunk, population)),
                                       self.active, micro_batches=self.micro_batches,
                                       hidden_buckets=self.hidden_buckets, mesh=self.mesh)

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
      `fn` reads it as `ctx.extra(name)` (e.g. a proxy's own minibatch format). Its leaves are
      stacked minibatches [k, rows, ...] of the validation batches' rows: on a mesh they are
      split over the batch axes as those are (`search.placement.data_shardings`).
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


def known_objectives() -> tuple[str, ...]:
  """Every name `search.objectives` accepts: the registered objectives, then the zero-cost
  proxies (registered when first used)."""
  from elastic_jax.proxies import PROXIES  # noqa: PLC0415
  return tuple(OBJECTIVES) + tuple(p for p in PROXIES if p != 'params' and p not in OBJECTIVES)


def check_not_empty(names: Sequence[str]) -> None:
  """UserError naming the accepted objectives when `search.objectives` names none."""
  if not names:
    raise UserError('search.objectives is empty; name at least one objective, e.g. '
                    f'("loss", "params"), from: {", ".join(known_objectives())}')


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    from elastic_jax.proxies import PROXIES  # noqa: PLC0415
    if name in PROXIES and name != 'params':
      from elastic_jax.search.proxy_objective import proxy_objective  # noqa: PLC0415
      return register_objective(proxy_objective(name))
    raise UserError(f'unknown objective {name!r}; known objectives: '
                    f'{", ".join(known_objectives())} (register more with '
                    'elastic_jax.search.objectives.register_objective)')
  return OBJECTIVES[name]


def training_free(names: Sequence[str]) -> bool:
  """Whether every objective is a zero-cost proxy or an analytic cost (nothing reads the trained
  supernet's validation loss or accuracy)."""
  from elastic_jax.proxies import PROXIES  # noqa: PLC0415
  return all(name in PROXIES or not get_objective(name).needs_model for name in names)


def _cost_fn(key: str) -> Callable[[Context], jax.Array]:
  return lambda ctx: ctx.cost[key].astype(jnp.float32)


def _register_builtins() -> None:
  for name, key in COST_KEYS.items():
    description, scale, unit = COST_INFO[name]
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


