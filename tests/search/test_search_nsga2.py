"""NSGA-II sorting, crowding and selection against plain-Python references.

The references are written the slow, obvious way (explicit loops over points and fronts) with the
conventions stated in `nsga2`'s docstring, so any disagreement is a bug in the vectorised code.
Integer-valued fitness makes ties and exact duplicate points common.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.search import nsga2


def _dominates(fi, fj, vi, vj):
  if vi != vj:
    return vi < vj
  return all(a <= b for a, b in zip(fi, fj)) and any(a < b for a, b in zip(fi, fj))


def _reference_rank(fitness, violation):
  p = len(fitness)
  rank = [-1] * p
  remaining = set(range(p))
  front = 0
  while remaining:
    current = [
        j
        for j in remaining
        if not any(_dominates(fitness[i], fitness[j], violation[i], violation[j])
                   for i in remaining if i != j)
    ]
    for j in current:
      rank[j] = front
    remaining -= set(current)
    front += 1
  return np.array(rank)


def _reference_crowding(fitness, rank):
  p, m = fitness.shape
  dist = np.zeros(p)
  for r in set(rank.tolist()):
    members = [i for i in range(p) if rank[i] == r]
    for k in range(m):
      srt = sorted(members, key=lambda i: (float(fitness[i, k]), i))
      span = float(fitness[srt[-1], k]) - float(fitness[srt[0], k])
      dist[srt[0]] = np.inf
      dist[srt[-1]] = np.inf
      for a in range(1, len(srt) - 1):
        gap = float(fitness[srt[a + 1], k]) - float(fitness[srt[a - 1], k])
        dist[srt[a]] += gap / span if span > 0 else 0.0
  return dist


def _fitness_sets():
  rng = np.random.default_rng(1234)
  sets = []
  for m in (2, 3):
    for p in (1, 2, 7, 31, 64):
      sets.append(rng.integers(0, 4, (p, m)).astype(np.float32))  # many ties and duplicates
      sets.append(rng.random((p, m), dtype=np.float32))
  # Shapes reused from above so that they share compiled programs.
  sets.append(np.ones((7, 2), np.float32))  # all identical: one front, two boundary points
  sets.append(np.stack([np.arange(31), 30 - np.arange(31)], 1).astype(np.float32))  # one front
  sets.append(np.stack([np.arange(31)] * 3, 1).astype(np.float32))  # a chain of 31 fronts
  return sets


@jax.jit
def _rank_and_crowding(fitness):
  rank = nsga2.non_dominated_rank(fitness)
  return rank, nsga2.crowding_distance(fitness, rank)


@pytest.mark.parametrize("case", range(len(_fitness_sets())))
def test_rank_and_crowding_match_reference(case):
  fitness = _fitness_sets()[case]
  p = fitness.shape[0]
  rank, crowd = (np.asarray(x) for x in _rank_and_crowding(fitness))
  np.testing.assert_array_equal(rank, _reference_rank(fitness.tolist(), [0.0] * p))
  np.testing.assert_allclose(crowd, _reference_crowding(fitness, rank), rtol=1e-5, atol=1e-6)


def test_constraint_domination_matches_reference_and_puts_feasible_first():
  rng = np.random.default_rng(7)
  for _ in range(5):
    fitness = rng.integers(0, 5, (40, 2)).astype(np.float32)
    violation = rng.choice([0.0, 0.0, 1.0, 2.5], size=40).astype(np.float32)
    rank = np.asarray(jax.jit(nsga2.non_dominated_rank)(fitness, violation))
    np.testing.assert_array_equal(rank, _reference_rank(fitness.tolist(), violation.tolist()))
    assert rank[violation == 0].max() < rank[violation > 0].min()
  # A bool mask is a feasibility mask: infeasible points rank behind every feasible one even
  # when their objectives are better.
  feasible = np.array([False, True, True])
  fitness = np.array([[0.0, 0.0], [5.0, 5.0], [6.0, 6.0]], np.float32)
  np.testing.assert_array_equal(nsga2.non_dominated_rank(fitness, feasible), [2, 0, 1])


def test_select_keeps_fronts_then_most_crowded_then_feasible():
  rng = np.random.default_rng(3)
  for m in (2, 3):
    fitness = rng.integers(0, 6, (50, m)).astype(np.float32)
    feasible = rng.random(50) < 0.8
    violation = (~feasible).astype(np.float32)
    keep = np.asarray(jax.jit(nsga2.nsga2_select, static_argnums=1)(fitness, 20, feasible))
    rank = _reference_rank(fitness.tolist(), violation.tolist())
    crowd = _reference_crowding(fitness, rank)
    expected = sorted(range(50), key=lambda i: (rank[i], -crowd[i], i))[:20]
    np.testing.assert_array_equal(keep, expected)
    assert len(set(keep.tolist())) == 20
    if feasible.sum() >= 20:
      assert feasible[keep].all()


def test_binary_tournament_prefers_better_rank():
  rank = jnp.array([0, 1, 2, 3] * 25)
  crowd = jnp.zeros(100)
  winners = np.asarray(nsga2.binary_tournament(jax.random.key(0), rank, crowd, 4000))
  counts = np.bincount(np.asarray(rank)[winners], minlength=4) / 4000
  # Binary tournament with replacement: P(win rank r) = ((4-r)^2 - (3-r)^2) / 16.
  np.testing.assert_allclose(counts, [7 / 16, 5 / 16, 3 / 16, 1 / 16], atol=0.03)
