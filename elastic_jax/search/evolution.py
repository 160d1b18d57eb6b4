"""Single-objective evolution (regularized/aging evolution, the W-PCA GA) and random-search steps.

All three share `SearchState` with NSGA-II, so the same driver runs them and their results are
comparable at an equal number of evaluations. Single-objective strategies optimise column
`objective` of the fitness; other columns are still recorded (best values, hypervolume), which is
how a parameter-count column can be reported next to the searched proxy.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from elastic_jax.errors import UserError
from elastic_jax.search import baselines, nsga2, operators
from elastic_jax.search import state as state_lib


def _check_children(n_children: int, p: int) -> None:
  if not 1 <= n_children <= p:
    raise UserError(f"n_children must be in [1, pop_size={p}] for this strategy, got {n_children}")


def evolution_step(
    state: state_lib.SearchState,
    key: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    *,
    feasible_fn: operators.FeasibleFn | None = None,
    n_children: int | None = None,
    sample_size: int = 10,
    mutation_prob: float | None = None,
    objective: int = 0,
    tries: int = 4,
    key_fn: operators.KeyFn | None = None,
) -> state_lib.SearchState:
  """One batch of regularized (aging) evolution (Real et al. 2019), B children at once.

  Each child: sample `sample_size` distinct members, take the best (feasible first, then
  objective), mutate it. The B valid children then replace the B oldest members, so every
  individual lives a fixed number of generations however good it is: the regularisation that
  makes aging evolution robust to noisy fitness. Batching B children (default P // 4) lets the
  fitness function evaluate them together; B = 1 is the sequential algorithm. Infeasible or
  duplicate children are dropped (W-PCA-style rejection) rather than inserted, so the population
  only ever holds feasible genomes once it is full. `mutation_prob` None means one expected gene
  change per child (1 / number of genes with more than one choice), the paper's one-gene edit.
  """
  p = state.genomes_PxG.shape[0]
  n_children = max(1, p // 4) if n_children is None else n_children
  _check_children(n_children, p)
  if not 1 <= sample_size <= p:
    raise UserError(f"sample_size must be in [1, pop_size={p}], got {sample_size}")
  if mutation_prob is None:
    mutation_prob = 1.0 / jnp.maximum(jnp.sum(state.gene_sizes_G > 1), 1)
  violation_P = state_lib.population_violation(state)
  position_P = state_lib.order_positions(
      state_lib.objective_order(state.fitness_PxM[:, objective], violation_P)
  )

  def propose(k, m):
    k_sample, k_mutate = jax.random.split(k)
    # The top `sample_size` of i.i.d. uniform keys is a uniform sample without replacement.
    _, contestants_MxS = jax.lax.top_k(jax.random.uniform(k_sample, (m, p)), sample_size)
    best_M = jnp.argmin(position_P[contestants_MxS], axis=1)
    parents_M = jnp.take_along_axis(contestants_MxS, best_M[:, None], axis=1)[:, 0]
    return operators.mutate(k_mutate, state.genomes_PxG[parents_M], state.gene_sizes_G,
                            mutation_prob)

  children_NxG, feasible_N, valid_N = state_lib.propose_children(
      state, key, propose, feasible_fn, n_children, tries, key_fn
  )
  state, fitness_NxM, feasible_N, violation_N, birth_N = state_lib.evaluate_children(
      state, evaluate_fn, children_NxG, feasible_N, valid_N, key_fn
  )
  valid_N = violation_N == 0
  # Empty slots (birth -1) come first, then the oldest; valid children are packed to the front.
  slots_N = jnp.argsort(state.birth_P, stable=True)[:n_children]
  source_N = jnp.argsort(~valid_N, stable=True)
  target_N = jnp.where(valid_N[source_N], slots_N, p)  # index p is dropped by the scatter

  def put(dest, src):
    return dest.at[target_N].set(src[source_N], mode="drop")

  return state._replace(
      genomes_PxG=put(state.genomes_PxG, children_NxG),
      fitness_PxM=put(state.fitness_PxM, fitness_NxM),
      feasible_P=put(state.feasible_P, feasible_N),
      birth_P=put(state.birth_P, birth_N),
  )


def ga_step(
    state: state_lib.SearchState,
    key: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    *,
    feasible_fn: operators.FeasibleFn | None = None,
    n_children: int | None = None,
    top_k: int | None = None,
    mutation_prob: float = 0.1,
    objective: int = 0,
    tries: int = 4,
    key_fn: operators.KeyFn | None = None,
) -> state_lib.SearchState:
  """One generation of the W-PCA genetic algorithm.

  As described in the W-PCA paper: uniform crossover between parents drawn uniformly from the
  top-k, per-gene mutation probability 0.1, candidates over the budget rejected. The paper does not
  say how the next population is formed; this keeps the best P of parents and children
  ((mu + lambda) truncation, feasible first), so the best architecture is never lost. Nor does
  it give k; the default is P // 5 (10 for its population of 50), at least 2 so that crossover
  can mix two parents.
  """
  p = state.genomes_PxG.shape[0]
  n_children = p if n_children is None else n_children
  top_k = min(p, max(2, p // 5)) if top_k is None else top_k
  if not 1 <= top_k <= p:
    raise UserError(f"top_k must be in [1, pop_size={p}], got {top_k}")
  violation_P = state_lib.population_violation(state)
  parents_K = state_lib.objective_order(state.fitness_PxM[:, objective], violation_P)[:top_k]

  def propose(k, m):
    k_a, k_b, k_x, k_m = jax.random.split(k, 4)
    a_M = parents_K[jax.random.randint(k_a, (m,), 0, top_k)]
    b_M = parents_K[jax.random.randint(k_b, (m,), 0, top_k)]
    kids_MxG = operators.crossover(k_x, state.genomes_PxG[a_M], state.genomes_PxG[b_M])
    return operators.mutate(k_m, kids_MxG, state.gene_sizes_G, mutation_prob)

  children_NxG, feasible_N, valid_N = state_lib.propose_children(
      state, key, propose, feasible_fn, n_children, tries, key_fn
  )
  state, fitness_NxM, feasible_N, violation_N, birth_N = state_lib.evaluate_children(
      state, evaluate_fn, children_NxG, feasible_N, valid_N, key_fn
  )
  fitness_KxM = jnp.concatenate([state.fitness_PxM, fitness_NxM])
  violation_K = jnp.concatenate([violation_P, violation_N])
  keep_P = state_lib.objective_order(fitness_KxM[:, objective], violation_K)[:p]
  return state._replace(
      genomes_PxG=jnp.concatenate([state.genomes_PxG, children_NxG])[keep_P],
      fitness_PxM=fitness_KxM[keep_P],
      feasible_P=jnp.concatenate([state.feasible_P, feasible_N])[keep_P],
      birth_P=jnp.concatenate([state.birth_P, birth_N])[keep_P],
  )


def random_step(
    state: state_lib.SearchState,
    key: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    *,
    feasible_fn: operators.FeasibleFn | None = None,
    n_children: int | None = None,
    tries: int = 4,
    key_fn: operators.KeyFn | None = None,
) -> state_lib.SearchState:
  """Random search as a strategy: fresh uniform feasible genomes each generation.

  The population is an elitist archive kept by NSGA-II survival, so it holds the best points of
  everything evaluated (for one objective: the P best) and random search is judged by the same
  yardstick (best values, hypervolume of the population) as the evolutionary strategies.
  """
  p = state.genomes_PxG.shape[0]
  n_children = p if n_children is None else n_children
  propose = lambda k, m: operators.random_genomes(k, state.gene_sizes_G, m)
  children_NxG, feasible_N, valid_N = state_lib.propose_children(
      state, key, propose, feasible_fn, n_children, tries, key_fn
  )
  state, fitness_NxM, feasible_N, violation_N, birth_N = state_lib.evaluate_children(
      state, evaluate_fn, children_NxG, feasible_N, valid_N, key_fn
  )
  return nsga2.merge_and_select(state, children_NxG, fitness_NxM, feasible_N, violation_N, birth_N)


def stratified_step(
    state: state_lib.SearchState,
    key: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    *,
    feasible_fn: operators.FeasibleFn | None = None,
    n_children: int | None = None,
    stratify_fn: Callable[[jax.Array], jax.Array],
    n_bins: int = 8,
    value_range: tuple[float, float] | None = None,
    tries: int = 8,
    key_fn: operators.KeyFn | None = None,
) -> state_lib.SearchState:
  """Stratified random search as a strategy: each generation's children spread evenly over bins
  of `stratify_fn` (e.g. parameter count); the population is the NSGA-II elitist archive, as in
  `random_step`, so both random baselines are judged like the evolutionary strategies. Children
  already evaluated (or members) are dropped, not resampled: resampling would skew the bins."""
  p = state.genomes_PxG.shape[0]
  n = p if n_children is None else n_children
  children_NxG, valid_N = baselines.stratified_random_search(
      key, state.gene_sizes_G, n, stratify_fn, n_bins, feasible_fn, tries, value_range)
  as_key = (lambda x: x) if key_fn is None else key_fn
  seen_KxG = jnp.concatenate([as_key(state.genomes_PxG), state.archive_AxG])
  seen_K = jnp.concatenate([state.occupied_P, state.archived_A])
  valid_N &= ~operators.is_duplicate(as_key(children_NxG), seen_KxG, valid_N, seen_K)
  feasible_N = (jnp.ones((n,), bool) if feasible_fn is None
                else jnp.asarray(feasible_fn(children_NxG), bool))
  state, fitness_NxM, feasible_N, violation_N, birth_N = state_lib.evaluate_children(
      state, evaluate_fn, children_NxG, feasible_N, valid_N, key_fn)
  return nsga2.merge_and_select(state, children_NxG, fitness_NxM, feasible_N, violation_N,
                                birth_N)
