"""Run a whole search as one compiled program.

The generations run under `jax.lax.scan` inside one `jax.jit`: the loop never returns to Python,
so the search costs one compile however many generations it has, and the fitness function (the
expensive part, e.g. a vmapped supernet forward) is traced exactly once. The jit is keyed on the
strategy, the functions (by identity), the sizes and the hyper-parameters, so calling
`run_evolution` again with the same `evaluate_fn` reuses the compiled program.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax.errors import UserError
from elastic_jax.search import evolution, nsga2, operators
from elastic_jax.search import state as state_lib
from elastic_jax.search.hypervolume import hypervolume_2d

STRATEGIES: dict[str, Callable[..., state_lib.SearchState]] = {
    "nsga2": nsga2.nsga2_step,
    "regularized": evolution.evolution_step,
    "ga": evolution.ga_step,
    "random": evolution.random_step,
}


class SearchResult(NamedTuple):
  """Final state and per-generation history (T = generations).

  Attributes:
    state: the final `SearchState` (population, fitness, feasibility, best-so-far records).
    best_TxM: best feasible value of each objective evaluated up to and including generation t.
    hypervolume_T: 2-D hypervolume of the feasible population after generation t, or None unless
      M == 2 and a reference point was given.
    n_evals_T: fitness evaluations spent up to and including generation t.
  """

  state: state_lib.SearchState
  best_TxM: jax.Array
  hypervolume_T: jax.Array | None
  n_evals_T: jax.Array


def default_n_children(strategy: str, pop_size: int) -> int:
  """Children per generation when not given: P, except B = P // 4 for aging evolution."""
  return max(1, pop_size // 4) if strategy == "regularized" else pop_size


@functools.partial(
    jax.jit,
    static_argnames=(
        "strategy",
        "evaluate_fn",
        "feasible_fn",
        "generations",
        "pop_size",
        "n_children",
        "strategy_kwargs",
    ),
)
def _run(
    key,
    gene_sizes_G,
    ref_M,
    *,
    strategy,
    evaluate_fn,
    feasible_fn,
    generations,
    pop_size,
    n_children,
    strategy_kwargs,
):
  g = gene_sizes_G.shape[0]
  # One jitted wrapper: eval_shape and the scan body then share its trace cache, so the user's
  # Python function runs once even though its output shape is needed before the loop.
  evaluate = jax.jit(evaluate_fn)
  out = jax.eval_shape(evaluate, jax.ShapeDtypeStruct((n_children, g), jnp.int32))
  if len(out.shape) != 2 or out.shape[0] != n_children:
    raise UserError(
        f"evaluate_fn must map int32[{n_children}, G] to float[{n_children}, M]; got {out.shape}"
    )
  n_objectives = out.shape[1]
  step = functools.partial(
      STRATEGIES[strategy],
      evaluate_fn=evaluate,
      feasible_fn=feasible_fn,
      n_children=n_children,
      **dict(strategy_kwargs),
  )
  with_hv = ref_M is not None and n_objectives == 2

  def generation(state, k):
    state = step(state, k)
    history = {"best": state.best_M, "n_evals": state.n_evals}
    if with_hv:
      mask_P = state.occupied_P & state.feasible_P
      history["hv"] = hypervolume_2d(state.fitness_PxM, ref_M, mask_P)
    return state, history

  state0 = state_lib.init_state(gene_sizes_G, pop_size, n_objectives)
  state, history = jax.lax.scan(generation, state0, jax.random.split(key, generations))
  return SearchResult(state, history["best"], history.get("hv"), history["n_evals"])


def run_evolution(
    key: jax.Array,
    strategy: str,
    gene_sizes: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    feasible_fn: operators.FeasibleFn | None = None,
    generations: int = 40,
    *,
    pop_size: int = 50,
    n_children: int | None = None,
    ref_point: jax.Array | None = None,
    **strategy_kwargs,
) -> SearchResult:
  """Runs `generations` generations of `strategy` from an empty population.

  The first ceil(pop_size / n_children) generations sample uniform random feasible genomes to
  fill the population (they count as generations and evaluations), then the strategy takes over;
  exactly `n_children` genomes are evaluated per generation, so runs of different strategies with
  equal `generations * n_children` had equal budgets. `evaluate_fn(int32[B, G]) -> float[B, M]`
  (all minimised) and `feasible_fn(int32[B, G]) -> bool[B]` must be jittable and are compared by
  identity for the compile cache. `strategy_kwargs` (Python scalars) go to the step function, e.g.
  mutation_prob, crossover_prob, sample_size, top_k, objective, tries.
  """
  if strategy not in STRATEGIES:
    raise UserError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
  if generations < 1 or pop_size < 1:
    raise UserError(f"generations and pop_size must be >= 1, got {generations}, {pop_size}")
  gene_sizes = jnp.asarray(gene_sizes, jnp.int32)
  if gene_sizes.ndim != 1:
    raise UserError(f"gene_sizes must be int32[G], got shape {gene_sizes.shape}")
  if not isinstance(gene_sizes, jax.core.Tracer) and bool(jnp.any(gene_sizes < 1)):
    raise UserError(f"every gene needs at least one choice; gene_sizes = {gene_sizes}")
  n_children = default_n_children(strategy, pop_size) if n_children is None else n_children
  ref = None if ref_point is None else jnp.asarray(ref_point, jnp.float32)
  return _run(
      key,
      gene_sizes,
      ref,
      strategy=strategy,
      evaluate_fn=evaluate_fn,
      feasible_fn=feasible_fn,
      generations=generations,
      pop_size=pop_size,
      n_children=n_children,
      strategy_kwargs=tuple(sorted(strategy_kwargs.items())),
  )
