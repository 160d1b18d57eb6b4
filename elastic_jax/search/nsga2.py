"""NSGA-II (Deb et al. 2002) with fixed shapes, vectorised over the population.

Populations in architecture search are a few hundred at most while each evaluation is expensive,
so the O(P^2 M) domination matrix is cheap and lets non-dominated sorting run as a short
`while_loop` of matrix-vector products (one per front) instead of per-individual Python loops.
Conventions, all deterministic so a NumPy reference can reproduce them exactly:
- constraint domination: i dominates j iff violation_i < violation_j, or the violations are equal
  and f_i Pareto-dominates f_j. With a boolean constraint this is Deb's rule (feasible beats
  infeasible); two infeasible points are then compared on their objectives rather than being
  mutually non-dominated, so the search still moves while no feasible point is known.
- crowding distance: per front and objective, members are sorted by (value, index); the first and
  last get +inf, the others (next - prev) / (front max - front min), 0 when that range is 0.
  Summed over objectives.
- environmental selection: sort by (rank, -crowding, index) and keep a prefix; the last front is
  truncated by crowding computed once (not recomputed after each removal), as in the paper.
"""

import jax
import jax.numpy as jnp

from elastic_jax.search import operators
from elastic_jax.search import state as state_lib


def _as_violation(violation_P: jax.Array | None, p: int) -> jax.Array:
  """Accepts a bool feasibility mask or a float violation (0 = feasible)."""
  if violation_P is None:
    return jnp.zeros((p,), jnp.float32)
  violation_P = jnp.asarray(violation_P)
  if violation_P.dtype == jnp.bool_:
    return (~violation_P).astype(jnp.float32)
  return violation_P.astype(jnp.float32)


def domination_matrix(fitness_PxM: jax.Array, violation_P: jax.Array | None = None) -> jax.Array:
  """bool[P, P]: entry [i, j] says i constraint-dominates j (see module docstring)."""
  fitness_PxM = jnp.asarray(fitness_PxM, jnp.float32)
  v_P = _as_violation(violation_P, fitness_PxM.shape[0])
  a = fitness_PxM[:, None, :]
  b = fitness_PxM[None, :, :]
  pareto_PxP = jnp.all(a <= b, axis=-1) & jnp.any(a < b, axis=-1)
  return (v_P[:, None] < v_P[None, :]) | ((v_P[:, None] == v_P[None, :]) & pareto_PxP)


def non_dominated_rank(fitness_PxM: jax.Array, violation_P: jax.Array | None = None) -> jax.Array:
  """int32[P] front index, 0 = non-dominated.

  Deb's fast non-dominated sort, vectorised: keep each point's count of not-yet-ranked
  dominators; the points whose count is zero form the next front, and removing a front subtracts
  its rows of the domination matrix. One iteration per front, so at most P.
  """
  dom_PxP = domination_matrix(fitness_PxM, violation_P)
  p = dom_PxP.shape[0]
  dom_i32 = dom_PxP.astype(jnp.int32)
  count_P = jnp.sum(dom_i32, axis=0)

  def cond(carry):
    _, _, ranked_P, _ = carry
    return ~jnp.all(ranked_P)

  def body(carry):
    rank_P, count_P, ranked_P, front = carry
    in_front_P = (count_P == 0) & ~ranked_P
    rank_P = jnp.where(in_front_P, front, rank_P)
    count_P = count_P - in_front_P.astype(jnp.int32) @ dom_i32
    return rank_P, count_P, ranked_P | in_front_P, front + 1

  init = (jnp.zeros((p,), jnp.int32), count_P, jnp.zeros((p,), bool), jnp.int32(0))
  rank_P, _, _, _ = jax.lax.while_loop(cond, body, init)
  return rank_P


def crowding_distance(fitness_PxM: jax.Array, rank_P: jax.Array) -> jax.Array:
  """float32[P] crowding distance within each front (boundary points +inf).

  Every objective is processed at once: a lexsort by (rank, value, index) puts each front's
  members next to each other in value order, so neighbours are the adjacent entries that share
  the rank, and the per-front range comes from segment min/max.
  """
  fitness_PxM = jnp.asarray(fitness_PxM, jnp.float32)
  rank_P = jnp.asarray(rank_P, jnp.int32)
  p = fitness_PxM.shape[0]
  index_P = jnp.arange(p)

  def one_objective(f_P):
    order_P = jnp.lexsort((index_P, f_P, rank_P))
    r_P = rank_P[order_P]
    v_P = f_P[order_P]
    same_prev = jnp.concatenate([jnp.zeros((1,), bool), r_P[1:] == r_P[:-1]])
    same_next = jnp.concatenate([r_P[:-1] == r_P[1:], jnp.zeros((1,), bool)])
    span_R = jax.ops.segment_max(f_P, rank_P, p) - jax.ops.segment_min(f_P, rank_P, p)
    span_P = span_R[r_P]
    span_P = jnp.where(span_P > 0, span_P, 1.0)
    prev_P = jnp.concatenate([v_P[:1], v_P[:-1]])
    next_P = jnp.concatenate([v_P[1:], v_P[-1:]])
    d_P = jnp.where(same_prev & same_next, (next_P - prev_P) / span_P, jnp.inf)
    return jnp.zeros((p,), jnp.float32).at[order_P].set(d_P)

  return jnp.sum(jax.vmap(one_objective, in_axes=1)(fitness_PxM), axis=0)


def nsga2_order(
    fitness_PxM: jax.Array, violation_P: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(order int32[P] best first, rank int32[P], crowding float32[P]) of a population."""
  rank_P = non_dominated_rank(fitness_PxM, violation_P)
  crowd_P = crowding_distance(fitness_PxM, rank_P)
  order_P = jnp.lexsort((jnp.arange(rank_P.shape[0]), -crowd_P, rank_P))
  return order_P, rank_P, crowd_P


def nsga2_select(
    fitness_NxM: jax.Array, n_keep: int, violation_N: jax.Array | None = None
) -> jax.Array:
  """Indices int32[n_keep] of NSGA-II environmental selection (feasible first, rank, crowding)."""
  order_N, _, _ = nsga2_order(fitness_NxM, violation_N)
  return order_N[:n_keep]


def binary_tournament(
    key: jax.Array, rank_P: jax.Array, crowding_P: jax.Array, n: int
) -> jax.Array:
  """Indices int32[n]: crowded-comparison binary tournament (lower rank, then larger crowding)."""
  order_P = jnp.lexsort((jnp.arange(rank_P.shape[0]), -crowding_P, rank_P))
  return operators.tournament_select(key, state_lib.order_positions(order_P), n, size=2)


def merge_and_select(
    state: state_lib.SearchState,
    children_NxG: jax.Array,
    fitness_NxM: jax.Array,
    feasible_N: jax.Array,
    violation_N: jax.Array,
    birth_N: jax.Array,
) -> state_lib.SearchState:
  """(mu + lambda) survival by NSGA-II order over the population and its children."""
  p = state.genomes_PxG.shape[0]
  fitness_KxM = jnp.concatenate([state.fitness_PxM, fitness_NxM])
  violation_K = jnp.concatenate([state_lib.population_violation(state), violation_N])
  keep_P = nsga2_select(fitness_KxM, p, violation_K)
  return state._replace(
      genomes_PxG=jnp.concatenate([state.genomes_PxG, children_NxG])[keep_P],
      fitness_PxM=fitness_KxM[keep_P],
      feasible_P=jnp.concatenate([state.feasible_P, feasible_N])[keep_P],
      birth_P=jnp.concatenate([state.birth_P, birth_N])[keep_P],
  )


def nsga2_step(
    state: state_lib.SearchState,
    key: jax.Array,
    evaluate_fn: state_lib.EvaluateFn,
    *,
    feasible_fn: operators.FeasibleFn | None = None,
    n_children: int | None = None,
    mutation_prob: float = 0.1,
    crossover_prob: float = 0.9,
    tries: int = 4,
    key_fn: operators.KeyFn | None = None,
) -> state_lib.SearchState:
  """One NSGA-II generation: tournament, uniform crossover, mutation, evaluate, survive.

  Children are over-generated `tries` times and filtered for feasibility and novelty, so the
  `n_children` evaluations (default P) go to new feasible genomes whenever the proposer can find
  them. Pure function of (state, key): jit it with `evaluate_fn` bound, or let `run_evolution`
  scan it.
  """
  p = state.genomes_PxG.shape[0]
  n_children = p if n_children is None else n_children
  rank_P = non_dominated_rank(state.fitness_PxM, state_lib.population_violation(state))
  crowd_P = crowding_distance(state.fitness_PxM, rank_P)

  def propose(k, m):
    k_a, k_b, k_x, k_m = jax.random.split(k, 4)
    a_M = binary_tournament(k_a, rank_P, crowd_P, m)
    b_M = binary_tournament(k_b, rank_P, crowd_P, m)
    kids_MxG = operators.crossover(
        k_x, state.genomes_PxG[a_M], state.genomes_PxG[b_M], crossover_prob
    )
    return operators.mutate(k_m, kids_MxG, state.gene_sizes_G, mutation_prob)

  children_NxG, feasible_N, valid_N = state_lib.propose_children(
      state, key, propose, feasible_fn, n_children, tries, key_fn
  )
  state, fitness_NxM, feasible_N, violation_N, birth_N = state_lib.evaluate_children(
      state, evaluate_fn, children_NxG, feasible_N, valid_N, key_fn
  )
  return merge_and_select(state, children_NxG, fitness_NxM, feasible_N, violation_N, birth_N)
