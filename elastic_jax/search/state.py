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


class MaskedEvaluate(NamedTuple):
  """An evaluate function that is told which children are wanted: `fn(genomes_NxG, active_N)`
  may skip the others (their rows are never read). The compiled loop wraps fitness functions
  in it so that rejected slots of a fixed-shape batch cost no forward pass."""

  fn: Callable[[jax.Array, jax.Array], jax.Array]

# Selection penalties, ordered: feasible < feasible but duplicate < infeasible < empty slot.
# Constraint domination compares these first, so each class only fills the population when the
# better classes cannot (Deb's rule with "degree of violation" replaced by these levels).
VIOLATION_DUPLICATE = 1.0
VIOLATION_INFEASIBLE = 2.0
VIOLATION_EMPTY = 3.0
# Rounds of proposals per generation to replace children that are duplicates or infeasible.
RESAMPLE_ROUNDS = 3


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
    n_evals: int32 scalar, distinct genomes evaluated so far (a child whose value is used:
      new, feasible; rejected slots of a fixed-shape batch do not count).
    archive_AxG: int32 the dedupe keys (see `key_fn` in `propose_children`) of the genomes
      evaluated so far, a ring buffer of capacity A: row `i % A` holds the i-th evaluated genome.
      Children equal to an archived genome are resampled, so no genome is evaluated twice while
      the archive has room. Once more than A genomes were evaluated the oldest rows are
      overwritten: those genomes may be proposed again (the population is always checked too).
    archive_fitness_AxM: float32 their (minimised) fitness, as evaluated.
  """

  genomes_PxG: jax.Array
  fitness_PxM: jax.Array
  feasible_P: jax.Array
  birth_P: jax.Array
  gene_sizes_G: jax.Array
  best_M: jax.Array
  best_genomes_MxG: jax.Array
  n_evals: jax.Array
  archive_AxG: jax.Array
  archive_fitness_AxM: jax.Array

  @property
  def occupied_P(self) -> jax.Array:
    return self.birth_P >= 0

  @property
  def archived_A(self) -> jax.Array:
    """bool[A]: which archive rows hold an evaluated genome."""
    return jnp.arange(self.archive_AxG.shape[0]) < self.n_evals


def init_state(gene_sizes_G: jax.Array, pop_size: int, n_objectives: int,
               archive_size: int = 0) -> SearchState:
  """An empty population; the first generations of any step fill it with random genomes.

  `archive_size` rows remember evaluated genomes across generations (0: only the current
  population is checked for duplicates)."""
  gene_sizes_G = jnp.asarray(gene_sizes_G, jnp.int32)
  g = gene_sizes_G.shape[0]
  if archive_size < 0:
    raise UserError(f"archive_size must be >= 0, got {archive_size}")
  return SearchState(
      genomes_PxG=jnp.zeros((pop_size, g), jnp.int32),
      fitness_PxM=jnp.zeros((pop_size, n_objectives), jnp.float32),
      feasible_P=jnp.zeros((pop_size,), bool),
      birth_P=jnp.full((pop_size,), -1, jnp.int32),
      gene_sizes_G=gene_sizes_G,
      best_M=jnp.full((n_objectives,), jnp.inf, jnp.float32),
      best_genomes_MxG=jnp.zeros((n_objectives, g), jnp.int32),
      n_evals=jnp.zeros((), jnp.int32),
      archive_AxG=jnp.zeros((archive_size, g), jnp.int32),
      archive_fitness_AxM=jnp.zeros((archive_size, n_objectives), jnp.float32),
  )


def archive_insert(state: SearchState, keys_NxG: jax.Array, fitness_NxM: jax.Array,
                   new_N: jax.Array) -> SearchState:
  """Appends the rows marked `new_N` to the archive (ring buffer) and counts them in n_evals."""
  a = state.archive_AxG.shape[0]
  rank_N = state.n_evals + jnp.cumsum(new_N.astype(jnp.int32)) - 1
  if a:
    slot_N = jnp.where(new_N, rank_N % a, a)  # index a is dropped by the scatter
    state = state._replace(
        archive_AxG=state.archive_AxG.at[slot_N].set(keys_NxG, mode="drop"),
        archive_fitness_AxM=state.archive_fitness_AxM.at[slot_N].set(fitness_NxM, mode="drop"))
  return state._replace(n_evals=state.n_evals + jnp.sum(new_N, dtype=jnp.int32))


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
    key_fn: operators.KeyFn | None = None,
    rounds: int = RESAMPLE_ROUNDS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """n children (int32[n, G], feasible bool[n], valid bool[n]) from the strategy's proposer.

  While the population still has empty slots the proposer is replaced by uniform random genomes
  (a `where`, not a `cond`: proposals are cheap, and the evaluation that follows is shared).
  Valid = feasible and not a duplicate of each other, of an occupied member or of an archived
  (already evaluated) genome; duplicates are compared by `key_fn(genomes)` (e.g. canonical
  genomes, one per network; default the genomes themselves). Slots left invalid after `rounds`
  rounds of `tries` candidates each are not counted as evaluations.
  """
  warming_up = ~jnp.all(state.occupied_P)

  def propose(k, m):
    k_random, k_strategy = jax.random.split(k)
    random_MxG = operators.random_genomes(k_random, state.gene_sizes_G, m)
    return jnp.where(warming_up, random_MxG, propose_fn(k_strategy, m))

  as_key = (lambda x: x) if key_fn is None else key_fn
  seen_KxG = jnp.concatenate([as_key(state.genomes_PxG), state.archive_AxG])
  seen_K = jnp.concatenate([state.occupied_P, state.archived_A])
  children_NxG, valid_N = operators.sample_feasible(
      key, propose, feasible_fn, n, tries, seen_KxG, seen_K, key_fn=key_fn, rounds=rounds
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
    key_fn: operators.KeyFn | None = None,
) -> tuple[SearchState, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Evaluates children; updates the archive, the evaluation count and best-so-far records.

  Only valid children (new and feasible) count as evaluations and enter the archive; the values
  of the other slots of the fixed-shape batch are never used (a `MaskedEvaluate` may skip them,
  and its other slots then count as infeasible).

  Returns (state, fitness float32[N, M], feasible bool[N], violation float32[N], birth
  int32[N]). A non-finite fitness row counts as infeasible: a failed evaluation must never
  displace a real one.
  """
  n = children_NxG.shape[0]
  evaluated_N = valid_N & feasible_N
  if isinstance(evaluate_fn, MaskedEvaluate):
    fitness_NxM = jnp.asarray(evaluate_fn.fn(children_NxG, evaluated_N), jnp.float32)
    # The other rows hold no real values: they must never rank as feasible.
    feasible_N = evaluated_N
  else:
    fitness_NxM = jnp.asarray(evaluate_fn(children_NxG), jnp.float32)
  m = state.fitness_PxM.shape[1]
  if fitness_NxM.shape != (n, m):
    raise UserError(
        f"evaluate_fn must map int32[{n}, G] genomes to float[{n}, {m}] fitness; "
        f"got shape {fitness_NxM.shape}"
    )
  raw_NxM = fitness_NxM
  feasible_N = feasible_N & jnp.all(jnp.isfinite(fitness_NxM), axis=1)
  valid_N = valid_N & feasible_N
  violation_N = jnp.where(
      valid_N, 0.0, jnp.where(feasible_N, VIOLATION_DUPLICATE, VIOLATION_INFEASIBLE)
  ).astype(jnp.float32)
  fitness_NxM = jnp.where(jnp.isfinite(fitness_NxM), fitness_NxM, 0.0)

  masked_NxM = jnp.where((feasible_N & evaluated_N)[:, None], fitness_NxM, jnp.inf)
  arg_M = jnp.argmin(masked_NxM, axis=0)
  candidate_M = masked_NxM[arg_M, jnp.arange(m)]
  better_M = candidate_M < state.best_M
  # Evaluation order; a rejected slot shares the number of the next evaluated child.
  evaluated_i32 = evaluated_N.astype(jnp.int32)
  birth_N = state.n_evals + jnp.cumsum(evaluated_i32) - evaluated_i32
  state = state._replace(
      best_M=jnp.where(better_M, candidate_M, state.best_M),
      best_genomes_MxG=jnp.where(better_M[:, None], children_NxG[arg_M], state.best_genomes_MxG),
  )
  keys_NxG = children_NxG if key_fn is None else key_fn(children_NxG)
  state = archive_insert(state, keys_NxG, raw_NxM, evaluated_N)
  return state, fitness_NxM, feasible_N, violation_N, birth_N


def objective_order(
    fitness_P: jax.Array, violation_P: jax.Array
) -> jax.Array:
  """Indices sorting by (violation, objective, index): single-objective constraint domination."""
  return jnp.lexsort((jnp.arange(fitness_P.shape[0]), fitness_P, violation_P))


def order_positions(order_P: jax.Array) -> jax.Array:
  """Inverse permutation: each individual's place in `order_P`, used as a tournament score."""
  return jnp.zeros_like(order_P).at[order_P].set(jnp.arange(order_P.shape[0], dtype=order_P.dtype))
