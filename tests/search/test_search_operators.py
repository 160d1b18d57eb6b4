"""Operators keep genomes in the space, respect constraints and reject duplicates exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.search import baselines, operators

# Odd sizes, including size-1 genes that can never change.
GENE_SIZES = jnp.array([3, 1, 7, 2, 5, 1, 11], jnp.int32)

# Jitted once here: eager dispatch would compile every primitive separately, which is slower.
random_genomes = jax.jit(operators.random_genomes, static_argnums=2)
mutate = jax.jit(operators.mutate, static_argnums=4)
crossover = jax.jit(operators.crossover)
random_search = jax.jit(
    baselines.random_search, static_argnames=("n", "feasible_fn", "tries"))
stratified = jax.jit(
    baselines.stratified_random_search,
    static_argnames=("n", "stratify_fn", "n_bins", "feasible_fn", "tries", "value_range"))


def _in_space(genomes):
  genomes = np.asarray(genomes)
  return genomes.dtype == np.int32 and np.all(genomes >= 0) and np.all(genomes < GENE_SIZES)


def test_random_genomes_cover_every_value_and_stay_in_range():
  genomes = np.asarray(random_genomes(jax.random.key(0), GENE_SIZES, 2000))
  assert genomes.shape == (2000, 7) and _in_space(genomes)
  for g, size in enumerate(np.asarray(GENE_SIZES)):
    counts = np.bincount(genomes[:, g], minlength=size)
    np.testing.assert_allclose(counts / 2000, 1 / size, atol=0.04)


@pytest.mark.parametrize("force_change", [True, False])
def test_mutate_stays_in_range_and_changes_at_rate_p(force_change):
  parents = random_genomes(jax.random.key(1), GENE_SIZES, 2000)
  children = np.asarray(mutate(jax.random.key(2), parents, GENE_SIZES, 0.3, force_change))
  assert _in_space(children)
  changed = children != np.asarray(parents)
  sizes = np.asarray(GENE_SIZES)
  assert not changed[:, sizes == 1].any()
  for g in np.flatnonzero(sizes > 1):
    # Forced: every resampled gene changes. Unforced: it keeps its value w.p. 1/size.
    expected = 0.3 if force_change else 0.3 * (1 - 1 / sizes[g])
    assert abs(changed[:, g].mean() - expected) < 0.035
  if force_change:
    # The new value is uniform over the other values.
    moved = (children[:, 6] - np.asarray(parents)[:, 6]) % 11
    counts = np.bincount(moved[moved > 0], minlength=11)[1:]
    assert counts.min() > 0.5 * counts.mean()
  same = mutate(jax.random.key(3), parents, GENE_SIZES, 0.0, force_change)
  np.testing.assert_array_equal(same, parents)


def test_crossover_takes_each_gene_from_a_parent():
  a = random_genomes(jax.random.key(4), GENE_SIZES, 2000)
  b = random_genomes(jax.random.key(5), GENE_SIZES, 2000)
  child = np.asarray(crossover(jax.random.key(6), a, b))
  a, b = np.asarray(a), np.asarray(b)
  assert _in_space(child) and np.all((child == a) | (child == b))
  differ = a != b
  assert abs((child == b)[differ].mean() - 0.5) < 0.02
  np.testing.assert_array_equal(crossover(jax.random.key(6), a, b, 0.0), a)


def test_tournament_and_top_k():
  score = jnp.array([5.0, 1.0, 3.0, 1.0, 9.0])
  np.testing.assert_array_equal(operators.top_k_indices(score, 3), [1, 3, 2])
  select = jax.jit(operators.tournament_select, static_argnums=(2, 3))
  winners = np.asarray(select(jax.random.key(0), score, 5000, 5))
  # The worst individual can only win a tournament made of itself alone.
  assert np.mean(winners == 4) < 0.01
  assert np.mean(np.isin(winners, [1, 3])) > 0.6


def _reference_duplicate(genomes, archive, valid, archive_valid):
  seen = {tuple(r) for r, v in zip(archive.tolist(), archive_valid) if v}
  out = []
  for row, v in zip(genomes.tolist(), valid):
    if not v:
      out.append(False)
      continue
    out.append(tuple(row) in seen)
    seen.add(tuple(row))
  return np.array(out)


def test_is_duplicate_matches_set_reference():
  rng = np.random.default_rng(0)
  sizes = np.array([2, 3, 1, 2], np.int32)  # only 12 distinct genomes: duplicates everywhere
  dup_fn = jax.jit(operators.is_duplicate)
  for _ in range(10):
    genomes = (rng.random((30, 4)) * sizes).astype(np.int32)
    archive = (rng.random((9, 4)) * sizes).astype(np.int32)
    valid = rng.random(30) < 0.8
    archive_valid = rng.random(9) < 0.7
    got = np.asarray(dup_fn(genomes, archive, valid, archive_valid))
    np.testing.assert_array_equal(
        got, _reference_duplicate(genomes, archive, valid, archive_valid))
  alone = np.asarray(operators.is_duplicate(genomes))
  np.testing.assert_array_equal(
      alone, _reference_duplicate(genomes, genomes[:0], np.ones(30, bool), []))


def _budget(genomes):
  """A stand-in parameter budget: the first genes act as sizes that must not add up too high."""
  return genomes[:, 0] + genomes[:, 2] + genomes[:, 6] <= 8


def test_sample_feasible_returns_feasible_distinct_genomes_and_a_mask():
  archive = random_genomes(jax.random.key(8), GENE_SIZES, 20)
  archive = archive[np.asarray(_budget(archive))]
  propose = lambda k, m: random_genomes(k, GENE_SIZES, m)
  sample = jax.jit(operators.sample_feasible, static_argnums=(1, 2, 3, 4))
  genomes, valid = sample(jax.random.key(9), propose, _budget, 64, 6, archive)
  genomes, valid = np.asarray(genomes), np.asarray(valid)
  assert valid.all() and _in_space(genomes) and np.asarray(_budget(genomes)).all()
  rows = {tuple(r) for r in genomes.tolist()}
  assert len(rows) == 64 and not rows & {tuple(r) for r in np.asarray(archive).tolist()}
  # A nearly impossible constraint: the mask must say which slots are real.
  rare = lambda g: jnp.all(g == jnp.array([2, 0, 6, 1, 4, 0, 10]), axis=1)
  genomes, valid = sample(jax.random.key(10), propose, rare, 16, 2)
  assert np.array_equal(np.asarray(rare(genomes)), np.asarray(valid))
  assert np.asarray(valid).sum() <= 1


def test_random_search_respects_constraint():
  genomes, valid = random_search(jax.random.key(11), GENE_SIZES, n=100, feasible_fn=_budget)
  assert np.asarray(valid).all() and np.asarray(_budget(genomes)).all() and _in_space(genomes)


def test_stratified_random_search_spreads_over_bins():
  sizes = jnp.full((4,), 10, jnp.int32)
  total = lambda g: jnp.sum(g, axis=1).astype(jnp.float32)
  n, n_bins = 40, 4
  genomes, valid = stratified(jax.random.key(12), sizes, n=n, stratify_fn=total, n_bins=n_bins,
                              tries=32, value_range=(0.0, 36.0))
  assert np.asarray(valid).all() and np.all(np.asarray(genomes) < 10)
  assert len({tuple(r) for r in np.asarray(genomes).tolist()}) == n
  bins = np.minimum(np.asarray(total(genomes)) // 9, 3).astype(int)
  np.testing.assert_array_equal(np.bincount(bins, minlength=n_bins), [10, 10, 10, 10])
  # Plain random search puts only ~2% of its samples in the lowest bin.
  plain, _ = random_search(jax.random.key(12), sizes, n=n)
  assert np.sum(np.asarray(total(plain)) < 9) < 5
  # With a constraint that empties the top bins, their share goes to the others.
  low = lambda g: jnp.sum(g, axis=1) < 18
  genomes, valid = stratified(jax.random.key(13), sizes, n=n, stratify_fn=total, n_bins=n_bins,
                              feasible_fn=low, tries=32, value_range=(0.0, 36.0))
  assert np.asarray(valid).all() and np.asarray(low(genomes)).all()
  bins = np.asarray(total(genomes)) // 9
  np.testing.assert_array_equal(np.bincount(bins.astype(int), minlength=n_bins), [20, 20, 0, 0])
