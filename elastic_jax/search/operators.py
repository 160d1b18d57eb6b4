"""Variation, selection and filtering operators on genomes.

A genome is int32[G] of choice indices; gene g lives in [0, gene_sizes[g]). Every index vector in
range decodes to a valid architecture, so no operator here ever needs a repair step for *range*:
they all map in-range genomes to in-range genomes. Constraints that depend on the decoded
architecture (parameter or FLOP budgets) are handled by rejection in `sample_feasible`, which
over-generates candidates and keeps the first feasible, non-duplicate ones. Everything has fixed
shapes so a search loop compiles once.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

FeasibleFn = Callable[[jax.Array], jax.Array]
ProposeFn = Callable[[jax.Array, int], jax.Array]
# genomes int32[N, G] -> dedupe keys int32[N, K]: equal keys = the same candidate (e.g. one
# canonical genome per network when the encoding is redundant).
KeyFn = Callable[[jax.Array], jax.Array]


def _uniform_index(key: jax.Array, sizes: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform integers in [0, sizes) with a per-element bound.

  Written with floor(u * size) because `randint` needs maxval > minval, which fails for the
  size-0 offset ranges that size-1 genes produce; the min() guards float rounding at u -> 1.
  """
  u = jax.random.uniform(key, shape)
  sizes = jnp.broadcast_to(sizes, shape)
  index = jnp.floor(u * sizes).astype(jnp.int32)
  return jnp.clip(index, 0, jnp.maximum(sizes - 1, 0))


def random_genomes(key: jax.Array, gene_sizes_G: jax.Array, n: int) -> jax.Array:
  """Uniform random genomes int32[n, G]: each gene independent and uniform over its choices."""
  gene_sizes_G = jnp.asarray(gene_sizes_G, jnp.int32)
  return _uniform_index(key, gene_sizes_G[None, :], (n, gene_sizes_G.shape[0]))


def mutate(
    key: jax.Array,
    genomes_PxG: jax.Array,
    gene_sizes_G: jax.Array,
    p: float | jax.Array,
    force_change: bool = True,
) -> jax.Array:
  """Per-gene resampling mutation with probability `p`.

  With `force_change` (the default) a resampled gene of size > 1 moves to one of the *other*
  values, uniformly. That makes `p` the real per-gene change rate (the W-PCA GA's "mutation
  probability 0.1" means a change) and avoids children identical to their parent, which would
  only be rejected as duplicates and waste evaluations. Size-1 genes never change.
  """
  gene_sizes_G = jnp.asarray(gene_sizes_G, jnp.int32)
  genomes_PxG = jnp.asarray(genomes_PxG, jnp.int32)
  k_hit, k_value = jax.random.split(key)
  sizes_1xG = gene_sizes_G[None, :]
  hit_PxG = jax.random.uniform(k_hit, genomes_PxG.shape) < p
  if force_change:
    offset_PxG = 1 + _uniform_index(k_value, sizes_1xG - 1, genomes_PxG.shape)
    new_PxG = (genomes_PxG + offset_PxG) % jnp.maximum(sizes_1xG, 1)
  else:
    new_PxG = _uniform_index(k_value, sizes_1xG, genomes_PxG.shape)
  return jnp.where(hit_PxG & (sizes_1xG > 1), new_PxG, genomes_PxG)


def crossover(
    key: jax.Array,
    parents_a_PxG: jax.Array,
    parents_b_PxG: jax.Array,
    p: float | jax.Array = 1.0,
) -> jax.Array:
  """Uniform crossover: one child per pair, each gene from either parent with probability 1/2.

  Genes are independent choices (no ordering between them), so uniform crossover is the natural
  recombination. `p` is the probability that a pair recombines at all; otherwise the child is a
  copy of parent a (and will then usually differ only through mutation).
  """
  k_pair, k_gene = jax.random.split(key)
  n = parents_a_PxG.shape[0]
  recombine_P = jax.random.uniform(k_pair, (n,)) < p
  take_b_PxG = jax.random.bernoulli(k_gene, 0.5, parents_a_PxG.shape) & recombine_P[:, None]
  return jnp.where(take_b_PxG, parents_b_PxG, parents_a_PxG)


def tournament_select(
    key: jax.Array, score_P: jax.Array, n: int, size: int = 2
) -> jax.Array:
  """Indices int32[n] of tournament winners; lower score wins.

  Contestants are drawn with replacement (the textbook tournament); a lexicographic criterion
  such as NSGA-II's (rank, -crowding) is passed as each individual's position in the sorted
  order, which keeps this operator scalar and shape-static.
  """
  contestants_NxS = jax.random.randint(key, (n, size), 0, score_P.shape[0])
  winner_N = jnp.argmin(score_P[contestants_NxS], axis=1)
  return jnp.take_along_axis(contestants_NxS, winner_N[:, None], axis=1)[:, 0]


def top_k_indices(score_P: jax.Array, k: int) -> jax.Array:
  """Indices int32[k] of the k lowest scores, ties broken by index (stable sort)."""
  return jnp.argsort(score_P, stable=True)[:k].astype(jnp.int32)


def is_duplicate(
    genomes_NxG: jax.Array,
    archive_AxG: jax.Array | None = None,
    valid_N: jax.Array | None = None,
    archive_valid_A: jax.Array | None = None,
) -> jax.Array:
  """bool[N]: row equals a valid archive row or an earlier valid row of `genomes_NxG`.

  The first occurrence of a genome is not a duplicate, later ones are; invalid rows neither count
  as duplicates nor make others duplicates. Exact (no hashing): rows are sorted lexicographically
  with a stable LSD radix pass, one stable argsort per gene inside a `fori_loop` so the compiled
  size does not grow with G, then adjacent rows are compared. O(K G log K) for K = A + N rows,
  instead of the O(K^2 G) memory of a pairwise equality tensor.
  """
  genomes_NxG = jnp.asarray(genomes_NxG, jnp.int32)
  n, g = genomes_NxG.shape
  valid_N = jnp.ones((n,), bool) if valid_N is None else jnp.asarray(valid_N, bool)
  if archive_AxG is None:
    rows_KxG, valid_K, n_archive = genomes_NxG, valid_N, 0
  else:
    archive_AxG = jnp.asarray(archive_AxG, jnp.int32)
    n_archive = archive_AxG.shape[0]
    archive_valid_A = (
        jnp.ones((n_archive,), bool)
        if archive_valid_A is None
        else jnp.asarray(archive_valid_A, bool)
    )
    rows_KxG = jnp.concatenate([archive_AxG, genomes_NxG])
    valid_K = jnp.concatenate([archive_valid_A, valid_N])

  def radix_pass(i, order_K):
    column_K = jax.lax.dynamic_index_in_dim(rows_KxG, g - 1 - i, axis=1, keepdims=False)
    return order_K[jnp.argsort(column_K[order_K], stable=True)]

  order_K = jax.lax.fori_loop(0, g, radix_pass, jnp.arange(rows_KxG.shape[0]))
  # Valid rows first; stability keeps the lexicographic order and, among equal rows, the
  # original index order, so archive rows precede candidates and earlier candidates precede later.
  order_K = order_K[jnp.argsort(~valid_K[order_K], stable=True)]
  sorted_KxG = rows_KxG[order_K]
  sorted_valid_K = valid_K[order_K]
  same_as_prev = jnp.all(sorted_KxG[1:] == sorted_KxG[:-1], axis=1)
  same_as_prev &= sorted_valid_K[1:] & sorted_valid_K[:-1]
  dup_sorted_K = jnp.concatenate([jnp.zeros((1,), bool), same_as_prev])
  dup_K = jnp.zeros_like(dup_sorted_K).at[order_K].set(dup_sorted_K)
  return dup_K[n_archive:]


def sample_feasible(
    key: jax.Array,
    propose_fn: ProposeFn,
    feasible_fn: FeasibleFn | None,
    n: int,
    tries: int = 4,
    archive_AxG: jax.Array | None = None,
    archive_valid_A: jax.Array | None = None,
    *,
    key_fn: KeyFn | None = None,
    rounds: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Rejection sampling with fixed shapes: (genomes int32[n, G], valid bool[n]).

  `propose_fn(key, m)` makes m = n * tries candidates; the first n that are feasible and not
  duplicates (of each other or of the valid archive rows) are returned, in proposal order, with
  valid = True. Slots still empty get up to `rounds - 1` more rounds of n * tries fresh
  candidates (a `cond` skips a round once every slot is filled). If fewer than n qualify, the
  remaining slots hold rejected candidates with valid = False: the shape cannot shrink inside
  jit, so callers must honour the mask. Rejection rather than repair because any repair rule
  biases the search distribution near the budget. Duplicates compare `key_fn(genomes)` (the
  archive holds keys); default the genomes themselves.
  """
  as_key = (lambda x: x) if key_fn is None else key_fn

  def one_round(k, chosen_NxG, valid_N):
    candidates_MxG = propose_fn(k, n * tries)
    m = candidates_MxG.shape[0]
    if chosen_NxG is None:  # first round: every slot is empty and will be overwritten
      chosen_NxG = candidates_MxG[:n]
    if feasible_fn is None:
      feasible_M = jnp.ones((m,), bool)
    else:
      feasible_M = jnp.asarray(feasible_fn(candidates_MxG), bool)
    # Seen: the archive and the children already chosen in earlier rounds.
    seen_KxG, seen_K = as_key(chosen_NxG), valid_N
    if archive_AxG is not None:
      archive_valid = (jnp.ones(archive_AxG.shape[:1], bool) if archive_valid_A is None
                       else jnp.asarray(archive_valid_A, bool))
      seen_KxG = jnp.concatenate([jnp.asarray(archive_AxG, jnp.int32), seen_KxG])
      seen_K = jnp.concatenate([archive_valid, seen_K])
    keep_M = feasible_M & ~is_duplicate(as_key(candidates_MxG), seen_KxG, feasible_M, seen_K)
    # The i-th empty slot takes the i-th kept candidate (or, if none is left, a rejected one).
    order_M = jnp.argsort(~keep_M, stable=True)
    take_N = order_M[jnp.clip(jnp.cumsum(~valid_N) - 1, 0, m - 1)]
    chosen_NxG = jnp.where(valid_N[:, None], chosen_NxG, candidates_MxG[take_N])
    return chosen_NxG, valid_N | keep_M[take_N]

  chosen_NxG, valid_N = one_round(key, None, jnp.zeros((n,), bool))
  for r in range(1, rounds):
    chosen_NxG, valid_N = jax.lax.cond(
        jnp.all(valid_N), lambda c, v: (c, v),
        lambda c, v, r=r: one_round(jax.random.fold_in(key, r), c, v), chosen_NxG, valid_N)
  return chosen_NxG, valid_N
