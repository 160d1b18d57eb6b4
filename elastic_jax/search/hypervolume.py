"""Pareto fronts and hypervolume, all objectives minimised.

The hypervolume of a point set is the measure of the region it dominates inside the box bounded by
a reference point: it rewards both convergence and spread with one number, which is what the
whittle-style searches lacked. The 2-D case runs in JAX (fixed shapes, masked entries) so the
search driver can log it every generation inside `lax.scan`; the general case is exact NumPy for
the small fronts of a final report.
"""

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit  # one program per shape: the report calls it on host arrays
def pareto_front_mask(fitness_PxM: jax.Array, mask_P: jax.Array | None = None) -> jax.Array:
  """bool[P]: valid rows that no other valid row Pareto-dominates.

  Duplicated points do not dominate each other, so all copies of a front point are kept.
  O(P^2 M), which is cheap for populations of a few hundred.
  """
  fitness_PxM = jnp.asarray(fitness_PxM)
  p = fitness_PxM.shape[0]
  mask_P = jnp.ones((p,), bool) if mask_P is None else jnp.asarray(mask_P, bool)
  a = fitness_PxM[:, None, :]
  b = fitness_PxM[None, :, :]
  dominates_PxP = jnp.all(a <= b, axis=-1) & jnp.any(a < b, axis=-1) & mask_P[:, None]
  return mask_P & ~jnp.any(dominates_PxP, axis=0)


def hypervolume_2d(
    points_Nx2: jax.Array, ref_2: jax.Array, mask_N: jax.Array | None = None
) -> jax.Array:
  """Exact 2-D hypervolume (minimisation) as a float32 scalar; jittable.

  Points that do not strictly dominate the reference point in both coordinates, and masked
  points, contribute nothing. Sorting by the first objective and taking the running minimum of
  the second gives the covered height of every vertical slab, so dominated points need no
  separate filtering: O(N log N) with fixed shapes.
  """
  points_Nx2 = jnp.asarray(points_Nx2, jnp.float32)
  ref_2 = jnp.asarray(ref_2, jnp.float32)
  n = points_Nx2.shape[0]
  mask_N = jnp.ones((n,), bool) if mask_N is None else jnp.asarray(mask_N, bool)
  inside_N = mask_N & jnp.all(points_Nx2 < ref_2, axis=1)
  # Excluded points sit on the reference corner, where they span zero area.
  pts_Nx2 = jnp.where(inside_N[:, None], points_Nx2, ref_2)
  order_N = jnp.lexsort((pts_Nx2[:, 1], pts_Nx2[:, 0]))
  x_N = pts_Nx2[order_N, 0]
  low_N = jax.lax.cummin(pts_Nx2[order_N, 1])
  x_next_N = jnp.concatenate([x_N[1:], ref_2[:1]])
  return jnp.sum((x_next_N - x_N) * (ref_2[1] - low_N))


def _nondominated_np(points_NxM: np.ndarray) -> np.ndarray:
  """Drop dominated points and exact duplicates: they add no volume and cost recursion time."""
  points_NxM = np.unique(points_NxM, axis=0)
  a = points_NxM[:, None, :]
  b = points_NxM[None, :, :]
  dominated = np.any(np.all(a <= b, axis=-1) & np.any(a < b, axis=-1), axis=0)
  return points_NxM[~dominated]


def _hypervolume_np(points_NxM: np.ndarray, ref_M: np.ndarray) -> float:
  """Hypervolume by slicing along the last objective (HSO); points strictly inside the box."""
  n, m = points_NxM.shape
  if n == 0:
    return 0.0
  if m == 1:
    return float(ref_M[0] - points_NxM[:, 0].min())
  points_NxM = _nondominated_np(points_NxM)
  order = np.argsort(points_NxM[:, -1], kind="stable")
  points_NxM = points_NxM[order]
  if m == 2:
    x_next = np.append(points_NxM[1:, 1], ref_M[1])
    # Sorted by objective 2 on a non-dominated set, objective 1 is decreasing: a staircase.
    return float(np.sum((x_next - points_NxM[:, 1]) * (ref_M[0] - points_NxM[:, 0])))
  total = 0.0
  tops = np.append(points_NxM[1:, -1], ref_M[-1])
  for i in range(points_NxM.shape[0]):
    depth = tops[i] - points_NxM[i, -1]
    if depth > 0:
      total += depth * _hypervolume_np(points_NxM[: i + 1, :-1], ref_M[:-1])
  return total


def hypervolume_nd(points_NxM, ref_M, mask_N=None) -> float:
  """Exact hypervolume for any number of objectives (NumPy, float64).

  The hypervolume-by-slicing-objectives recursion: sort by the last objective, and each slab
  between consecutive values contributes its depth times the (M-1)-D hypervolume of the points
  below it. Cost grows like N^(M-1) log N, comfortably fast for the intended <= ~60 points with
  M <= 4; dominated points are pruned at every level.
  """
  points_NxM = np.asarray(points_NxM, np.float64)
  ref_M = np.asarray(ref_M, np.float64)
  if points_NxM.ndim != 2 or points_NxM.shape[1] != ref_M.shape[0]:
    raise ValueError(
        f"points must be [N, M] with M = len(ref) = {ref_M.shape[0]}, got {points_NxM.shape}"
    )
  keep = np.all(points_NxM < ref_M, axis=1)
  if mask_N is not None:
    keep &= np.asarray(mask_N, bool)
  return _hypervolume_np(points_NxM[keep], ref_M)
