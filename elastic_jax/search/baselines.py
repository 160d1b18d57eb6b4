"""Random-search baselines: a search algorithm is only worth its cost if it beats these.

Uniform sampling of genomes concentrates scalar properties such as the parameter count in the
middle of their range (a sum of many independent genes), so plain random search rarely visits
very small or very large architectures. The stratified variant spreads a fixed budget evenly over
equal-width bins of a caller-provided scalar, which is what makes it a fair baseline when the
front of interest spans model sizes.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from elastic_jax.search import operators


def random_search(
    key: jax.Array,
    gene_sizes_G: jax.Array,
    n: int,
    feasible_fn: operators.FeasibleFn | None = None,
    tries: int = 4,
) -> tuple[jax.Array, jax.Array]:
  """n distinct feasible uniform random genomes: (int32[n, G], valid bool[n])."""
  propose = lambda k, m: operators.random_genomes(k, gene_sizes_G, m)
  return operators.sample_feasible(key, propose, feasible_fn, n, tries)


def stratified_random_search(
    key: jax.Array,
    gene_sizes_G: jax.Array,
    n: int,
    stratify_fn: Callable[[jax.Array], jax.Array],
    n_bins: int,
    feasible_fn: operators.FeasibleFn | None = None,
    tries: int = 8,
    value_range: tuple[float, float] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """n genomes spread evenly over equal-width bins of `stratify_fn(genomes) -> float[N]`.

  Over-generates n * tries uniform candidates, keeps feasible distinct ones, bins them by the
  scalar (bins span `value_range`, or the kept candidates' min..max when None) and takes them
  round-robin: every bin's first kept candidate, then every bin's second, and so on. So each bin
  gets floor or ceil of n / n_bins when it has enough candidates, and the share of a bin that runs
  dry goes evenly to the others instead of being lost. The bin order within a round is a random
  permutation so no bin is systematically favoured by the remainder. Returns (int32[n, G],
  valid bool[n]) like `operators.sample_feasible`.
  """
  k_cand, k_perm = jax.random.split(key)
  candidates_MxG, keep_M = random_search(k_cand, gene_sizes_G, n * tries, feasible_fn, tries=1)
  m = candidates_MxG.shape[0]
  value_M = jnp.asarray(stratify_fn(candidates_MxG), jnp.float32)
  if value_range is None:
    lo = jnp.min(jnp.where(keep_M, value_M, jnp.inf))
    hi = jnp.max(jnp.where(keep_M, value_M, -jnp.inf))
  else:
    lo, hi = (jnp.float32(v) for v in value_range)
  width = jnp.where(hi > lo, (hi - lo) / n_bins, 1.0)
  bin_M = jnp.clip(jnp.floor((value_M - lo) / width), 0, n_bins - 1).astype(jnp.int32)
  # Position of each kept candidate within its bin, in proposal (i.e. random) order.
  onehot_MxB = jax.nn.one_hot(bin_M, n_bins, dtype=jnp.int32) * keep_M[:, None]
  within_M = jnp.take_along_axis(jnp.cumsum(onehot_MxB, axis=0), bin_M[:, None], axis=1)[:, 0] - 1
  bin_rank_B = jax.random.permutation(k_perm, n_bins)
  within_M = jnp.where(keep_M, within_M, m)  # rejected candidates go last
  order_M = jnp.lexsort((jnp.arange(m), bin_rank_B[bin_M], within_M))
  chosen_N = order_M[:n]
  return candidates_MxG[chosen_N], keep_M[chosen_N]
