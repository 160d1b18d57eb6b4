"""Hypervolume and Pareto masks against brute-force references.

References: exact counting of unit cells on an integer grid, inclusion-exclusion over all subsets
of a small set (the volume of an intersection of boxes [p, ref] is a product), and Monte Carlo.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.search import hypervolume as hv


def _inclusion_exclusion(points, ref):
  points = [p for p in np.asarray(points, np.float64) if np.all(p < ref)]
  total = 0.0
  for size in range(1, len(points) + 1):
    for subset in itertools.combinations(points, size):
      corner = np.max(subset, axis=0)
      total += (-1) ** (size + 1) * np.prod(ref - corner)
  return total


def _grid_count(points, ref):
  """Unit cells [a, a+1) x [b, b+1) below ref covered by some point's box."""
  covered = np.zeros(ref.astype(int), bool)
  for x, y in np.asarray(points, int):
    covered[max(x, 0):, max(y, 0):] = True
  return covered.sum()


hv2d = jax.jit(hv.hypervolume_2d)


def test_hypervolume_2d_matches_grid_count_with_ties_and_outside_points():
  rng = np.random.default_rng(0)
  ref = np.array([20.0, 15.0], np.float32)
  for n in (1, 5, 40, 40, 40):
    # Integer points: ties and duplicates; some on or beyond the reference (contribute nothing).
    points = rng.integers(0, 23, (n, 2)).astype(np.float32)
    inside = np.all(points < ref, axis=1)
    expected = _grid_count(points[inside], ref)
    assert float(hv2d(points, ref)) == pytest.approx(expected, abs=1e-3)


def test_hypervolume_2d_masked_matches_inclusion_exclusion():
  rng = np.random.default_rng(1)
  ref = np.array([1.0, 1.2], np.float32)
  for _ in range(10):
    points = rng.random((9, 2)).astype(np.float32) * 1.1
    mask = rng.random(9) < 0.7
    expected = _inclusion_exclusion(points[mask], ref.astype(np.float64))
    assert float(hv2d(points, ref, mask)) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert hv.hypervolume_nd(points, ref, mask) == pytest.approx(expected, rel=1e-9, abs=1e-12)
  assert float(hv2d(points, ref, np.zeros(9, bool))) == 0.0


@pytest.mark.parametrize("m", [3, 4])
def test_hypervolume_exact_matches_inclusion_exclusion(m):
  rng = np.random.default_rng(m)
  ref = np.full(m, 1.0)
  for n in (1, 2, 6, 10):
    points = rng.random((n, m))
    points[0] = points[-1]  # a duplicate
    expected = _inclusion_exclusion(points, ref)
    assert hv.hypervolume_nd(points, ref) == pytest.approx(expected, rel=1e-10, abs=1e-12)
  ints = rng.integers(0, 3, (10, m)).astype(float)  # ties in every objective
  assert hv.hypervolume_nd(ints, ref * 3) == pytest.approx(_inclusion_exclusion(ints, ref * 3))


def test_hypervolume_3d_matches_monte_carlo_on_a_larger_front():
  rng = np.random.default_rng(5)
  # Points on the simplex x + y + z = 1: all mutually non-dominated.
  points = rng.dirichlet(np.ones(3), size=60)
  ref = np.full(3, 1.1)
  samples = rng.random((400_000, 3)) * ref
  dominated = np.zeros(len(samples), bool)
  for p in points:
    dominated |= np.all(samples >= p, axis=1)
  estimate = dominated.mean() * np.prod(ref)
  stderr = np.sqrt(dominated.mean() * (1 - dominated.mean()) / len(samples)) * np.prod(ref)
  assert abs(hv.hypervolume_nd(points, ref) - estimate) < 4 * stderr


def test_pareto_front_mask_matches_brute_force():
  rng = np.random.default_rng(2)
  for m in (2, 3):
    fitness = rng.integers(0, 5, (45, m)).astype(np.float32)
    mask = rng.random(45) < 0.8
    got = np.asarray(jax.jit(hv.pareto_front_mask)(jnp.asarray(fitness), mask))
    expected = [
        bool(mask[j]) and not any(
            mask[i] and np.all(fitness[i] <= fitness[j]) and np.any(fitness[i] < fitness[j])
            for i in range(45))
        for j in range(45)
    ]
    np.testing.assert_array_equal(got, expected)
