"""Cost budgets of the search: which genomes are feasible (a jittable constraint)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.errors import UserError
from elastic_jax.search.genomes import COST_INFO, COST_KEYS, extreme_value
from elastic_jax.space import Space


def check_bound(name: str, value) -> float:
  """`search.budgets.<name>` as a float: 0 (or None) for no budget, else a positive absolute bound
  in the cost's own units (parameters, FLOPs per token, bytes per token). UserError otherwise."""
  description = COST_INFO[name][0] if name in COST_INFO else 'the cost\'s own units'
  try:
    bound = 0.0 if value is None else float(value)
  except (TypeError, ValueError):
    bound = float('nan')
  if not (bound >= 0 and math.isfinite(bound)):
    shown = f'{value:g}' if isinstance(value, (int, float)) else repr(value)
    raise UserError(f'search.budgets.{name}={shown} is invalid: a budget must be a positive '
                    f'number, an absolute upper bound in {description} (not a fraction), or 0 '
                    'for no budget')
  return bound


@dataclasses.dataclass(frozen=True, init=False)
class Budgets:
  """Constraint `feasible(genomes_BxG) -> bool[B]` from analytic cost budgets (jittable).

  `budgets` maps cost names (`COST_KEYS`: params, flops, kv_cache, ...) to upper bounds, positive
  and absolute (`check_bound`); a value of 0 or None means no budget. A frozen dataclass equal by
  value (the space's key and the budgets), so jitted loops are shared between runs.
  """

  space: Space = dataclasses.field(compare=False, repr=False)
  budgets: tuple[tuple[str, float], ...]
  space_key: tuple = dataclasses.field(repr=False)

  def __init__(self, space: Space, budgets: Mapping[str, float | None]):
    unknown = sorted(set(budgets) - set(COST_KEYS))
    if unknown:
      raise UserError(f'search.budgets.{unknown[0]} is not a budgetable cost; use one of '
                      f'{", ".join(COST_KEYS)}')
    bounds = {k: check_bound(k, v) for k, v in budgets.items()}
    object.__setattr__(self, 'space', space)
    object.__setattr__(self, 'budgets', tuple(sorted((k, v) for k, v in bounds.items() if v)))
    object.__setattr__(self, 'space_key', space.key())

  def __bool__(self):
    return bool(self.budgets)

  def __call__(self, genomes_BxG: jax.Array) -> jax.Array:
    cost = jax.vmap(lambda g: self.space.cost(self.space.decode(g)))(genomes_BxG)
    ok = jnp.ones(genomes_BxG.shape[:1], bool)
    for name, bound in self.budgets:
      ok &= cost[COST_KEYS[name]].astype(jnp.float32) <= jnp.float32(bound)
    return ok

  def feasible(self, genomes_BxG) -> np.ndarray:
    """Host convenience: `self(genomes)` as NumPy bool[B], from the genomes' analytic costs
    (`Space.genome_costs`: one compiled program per padded batch size and equal space)."""
    cost = self.space.genome_costs(genomes_BxG)
    ok = np.ones(len(next(iter(cost.values()))), bool)
    for name, bound in self.budgets:
      ok &= cost[COST_KEYS[name]].astype(np.float32) <= np.float32(bound)
    return ok

  def check(self, sample: int = 4096, seed: int = 0) -> float:
    """Raises UserError unless some architecture meets every budget; returns the feasible share
    of uniform random genomes (a small share makes the search's rejection sampling slow)."""
    for name, bound in self.budgets:
      lowest = extreme_value(self.space, name, largest=False)
      if lowest > bound:
        description, scale, unit = COST_INFO[name]
        raise UserError(
            f'search.budgets.{name}={bound:,.6g} is below the smallest achievable value in this '
            f'search space: {lowest:,.6g} {description} ({lowest / scale:.4g} {unit}); raise '
            'the budget' + (' (it is an absolute bound, not a fraction)' if bound <= 1 else ''))
    if not self.budgets:
      return 1.0
    genomes = self.space.random_genomes(jax.random.key(seed), sample)
    share = float(np.mean(self.feasible(genomes)))
    if share == 0.0:
      # Each budget alone is achievable; check the all-smallest architectures jointly.
      extremes = [self.space.encode(self.space.smallest())]
      if not bool(np.any(self.feasible(np.stack(extremes)))):
        raise UserError(f'no architecture meets all of search.budgets {dict(self.budgets)} '
                        'together (each alone is achievable); raise one of them')
    return share

