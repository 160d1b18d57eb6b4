"""The search state shared by every strategy, and the steps every generation has in common.

One state type for NSGA-II, regularized evolution, the W-PCA GA and random search lets a single
driver run any of them under `lax.scan`. A search starts from an *empty* population (all slots
unoccupied) instead of an evaluated random one: the first generations then propose uniform random
genomes until every slot is filled. That keeps exactly one call to the fitness function in the
program, with one batch shape, so `evaluate_fn` is traced once however long the run is, and every
strategy spends exactly `n_children` evaluations per generation, which makes comparisons at equal
evaluation budgets trivial.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax.errors import UserError
from elastic_jax.search import operators

EvaluateFn = Callable[[jax.Array], jax.Array]

# Selection penalties, ordered: feasible < feasible but duplicate < infeasible < empty slot.
# Constraint domination compares these first, so each class only fills the population when the
# better classes cannot (Deb's rule with "degree of violation" replaced by these levels).
VIOLATION_DUPLICATE = 1.0
VIOLATION_INFEASIBLE = 2.0
VIOLATION_EMPTY = 3.0


class SearchState(NamedTuple):
  """A population of P genomes with M objectives (minimised), as a pytree.

  Attributes:
    genomes_PxG: int32 choice indices.
    fitness_PxM: float32; 0 in empty slots (never read there: selection sees the empty penalty).
    feasible_P: bool, the caller's constraint (and finite fitness); False in empty slots.
    birth_P: int32 evaluation index at which the individual was evaluated; -1 marks an empty
      slot. Regularized evolution removes the smallest (oldest) first.
    gene_sizes_G: int32 number of choices per gene; carried here so steps need no extra argument.
    best_M: float32 best feasible value of each objective ever evaluated (+inf before any).
    best_genomes_MxG: int32 the genome that achieved each `best_M` entry.
    n_evals: int32 scalar, fitness evaluations so far (every proposed child counts).
  """

  genomes_PxG: jax.Array
  fitness_PxM: jax.Array
  feasible_P: jax.Array
  birth_P: jax.Array
  gene_sizes_G: jax.Array
  best_M: jax.Array
  best_genomes_MxG: jax.Array
  n_evals: jax.Array

  @property
  def occupied_P(self) -> jax.Array:
    return self.birth_P >= 0


def init_state(gene_sizes_G: jax.Array, pop_size: int, n_objectives: int) -> SearchState:
  """An empty population; the first generations of any step fill it with random genomes."""
  gene_sizes_G = jnp.asarray(gene_sizes_G, jnp.int32)
  g = gene_sizes_G.shape[0]
  return SearchState(
      genomes_PxG=jnp.zeros((pop_size, g), jnp.int32),
      fitness_PxM=jnp.zeros((pop_size, n_objectives), jnp.float32),
      feasible_P=jnp.zeros((pop_size,), bool),
      birth_P=jnp.full((pop_size,), -1, jnp.int32),
      gene_sizes_G=gene_sizes_G,
      best_M=jnp.full((n_objectives,), jnp.inf, jnp.float32),
      best_genomes_MxG=jnp.zeros((n_objectives, g), jnp.int32),
      n_evals=jnp.zeros((), jnp.int32),
  )


def population_violation(state: SearchState) -> jax.Array:
  """float32[P] selection penalty of the current members (0 = feasible)."""
  return jnp.where(
      state.occupied_P,
      jnp.where(state.feasible_P, 0.0, VIOLATION_INFEASIBLE),
      VIOLATION_EMPTY,
  ).astype(jnp.float32)


def propose_children(
    state: SearchState,
    key: jax.Array,
    propose_fn: operators.ProposeFn,
    feasible_fn: operators.FeasibleFn | None,
    n: int,
    tries: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """n children (int32[n, G], feasible bool[n], valid bool[n]) from the strategy's proposer.

  While the population still has empty slots the proposer is replaced by uniform random genomes
  (a `where`, not a `cond`: proposals are cheap, and the evaluation that follows is shared).
  Valid = feasible and not a duplicate of each other or of an occupied member.
  """
  warming_up = ~jnp.all(state.occupied_P)

  def propose(k, m):
    k_random, k_strategy = jax.random.split(k)
    random_MxG = operators.random_genomes(k_random, state.gene_sizes_G, m)
    return jnp.where(warming_up, random_MxG, propose_fn(k_strategy, m))

  children_NxG, valid_N = operators.sample_feasible(
      key, propose, feasible_fn, n, tries, state.genomes_PxG, state.occupied_P
  )
  if feasible_fn is None:
    feasible_N = jnp.ones((n,), bool)
  else:
    # Cheap second call so that feasible duplicates can rank above infeasible children.
    feasible_N = jnp.asarray(feasible_fn(children_NxG), bool)
  return children_NxG, feasible_N, valid_N


def evaluate_children(
    state: SearchState,
    evaluate_fn: EvaluateFn,
    children_NxG: jax.Array,
    feasible_N: jax.Array,
    valid_N: jax.Array,
) -> tuple[SearchState, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Evaluates children; updates the evaluation count and best-so-far records.

  Returns (state, fitness float32[N, M], feasible bool[N], violation float32[N], birth
  int32[N]). A non-finite fitness row counts as infeasible: a failed evaluation must never
  displace a real one.
  """
  n = children_NxG.shape[0]
  fitness_NxM = jnp.asarray(evaluate_fn(children_NxG), jnp.float32)
  m = state.fitness_PxM.shape[1]
  if fitness_NxM.shape != (n, m):
    raise UserError(
        f"evaluate_fn must map int32[{n}, G] genomes to float[{n}, {m}] fitness; "
        f"got shape {fitness_NxM.shape}"
    )
  feasible_N = feasible_N & jnp.all(jnp.isfinite(fitness_NxM), axis=1)
  valid_N = valid_N & feasible_N
  violation_N = jnp.where(
      valid_N, 0.0, jnp.where(feasible_N, VIOLATION_DUPLICATE, VIOLATION_INFEASIBLE)
  ).astype(jnp.float32)
  fitness_NxM = jnp.where(jnp.isfinite(fitness_NxM), fitness_NxM, 0.0)

  masked_NxM = jnp.where(feasible_N[:, None], fitness_NxM, jnp.inf)
  arg_M = jnp.argmin(masked_NxM, axis=0)
  candidate_M = masked_NxM[arg_M, jnp.arange(m)]
  better_M = candidate_M < state.best_M
  birth_N = state.n_evals + jnp.arange(n, dtype=jnp.int32)
  state = state._replace(
      best_M=jnp.where(better_M, candidate_M, state.best_M),
      best_genomes_MxG=jnp.where(better_M[:, None], children_NxG[arg_M], state.best_genomes_MxG),
      n_evals=state.n_evals + n,
  )
  return state, fitness_NxM, feasible_N, violation_N, birth_N


def objective_order(
    fitness_P: jax.Array, violation_P: jax.Array
) -> jax.Array:
  """Indices sorting by (violation, objective, index): single-objective constraint domination."""
  return jnp.lexsort((jnp.arange(fitness_P.shape[0]), fitness_P, violation_P))


def order_positions(order_P: jax.Array) -> jax.Array:
  """Inverse permutation: each individual's place in `order_P`, used as a tournament score."""
  return jnp.zeros_like(order_P).at[order_P].set(jnp.arange(order_P.shape[0], dtype=order_P.dtype))
