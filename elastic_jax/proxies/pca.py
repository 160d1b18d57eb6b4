"""The PCA count at the heart of W-PCA, jittable and batched.

`pca_count(h_NxD, eta)` is the number of principal components of the rows of `h_NxD` (N samples of
D features) whose cumulative explained-variance ratio first *exceeds* `eta`:

  1. centre every column with the mean over the valid rows (`row_weight_N` 1 = valid, 0 = left
     out; left-out rows are zeroed after centring, so they add nothing);
  2. covariance C = X^T X / (N_valid - 1) (D x D), or, when N < D, the Gram matrix X X^T /
     (N_valid - 1) (N x N), which has the same non-zero eigenvalues and is cheaper (the choice is
     static, from the shapes);
  3. eigenvalues (`jnp.linalg.eigvalsh`, float32) in descending order; k = the smallest k with
     sum(lambda_1..k) / sum(lambda) > eta.

(Tridiagonalisation + bisection, `jax.scipy.linalg.eigh_tridiagonal`, skips the eigenvectors and is
~4x faster for one 256-wide matrix at top level on CPU, but slower inside the scans that score a
population, and compiles ~10x slower; measured, not adopted.)

Numerics (float32). Columns that are constant over the valid rows (all-zero masked FFN columns
included) are set exactly to zero after centring, so rounding in the mean cannot invent variance.
Eigenvalues at or below `tol = max(N_valid, D_varying) * eps32 * lambda_max` are eigensolver noise
(this is NumPy's `matrix_rank` tolerance; tiny negative eigenvalues fall here too) and are set to
zero before the cumulative sum; `D_varying` counts the non-constant columns, so appending zero
columns (a masked FFN) changes neither the tolerance nor any eigenvalue above it. k never exceeds
the number of eigenvalues above `tol` (the numerical rank), and is 0 when no column varies (zero
total variance). The count is exact against a float64 reference except when a cumulative ratio
lies within float32 rounding (~1e-6) of `eta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS32 = float(jnp.finfo(jnp.float32).eps)


def pca_count(h_NxD: jax.Array, eta: float, row_weight_N: jax.Array | None = None) -> jax.Array:
  """int32 number of principal components explaining more than `eta` of the variance.

  Args:
    h_NxD: N samples (tokens) of D features (e.g. one FFN layer's pre-activations).
    eta: explained-variance threshold in (0, 1) (validated by the caller's config).
    row_weight_N: 1 for rows to use, 0 for rows to leave out (padding); None = all rows.
  """
  h_NxD = h_NxD.astype(jnp.float32)
  n, d = h_NxD.shape
  if row_weight_N is None:
    w_N = jnp.ones((n,), jnp.float32)
  else:
    w_N = (row_weight_N > 0).astype(jnp.float32)
  n_valid = jnp.sum(w_N)
  mean_D = jnp.sum(h_NxD * w_N[:, None], axis=0) / jnp.maximum(n_valid, 1.0)
  # A column is constant if its valid entries span no range: zero it exactly.
  big = jnp.finfo(jnp.float32).max
  hi_D = jnp.max(jnp.where(w_N[:, None] > 0, h_NxD, -big), axis=0)
  lo_D = jnp.min(jnp.where(w_N[:, None] > 0, h_NxD, big), axis=0)
  varying_D = (hi_D > lo_D).astype(jnp.float32)
  x_NxD = (h_NxD - mean_D) * w_N[:, None] * varying_D
  denom = jnp.maximum(n_valid - 1.0, 1.0)
  if n < d:
    m = jnp.einsum('ND,MD->NM', x_NxD, x_NxD) / denom
  else:
    m = jnp.einsum('ND,NE->DE', x_NxD, x_NxD) / denom
  ev = jnp.linalg.eigvalsh(0.5 * (m + m.T))[::-1]  # descending
  dims = jnp.maximum(n_valid, jnp.sum(varying_D))
  tol = dims * _EPS32 * jnp.maximum(ev[0], 0.0)
  ev = jnp.where(ev > tol, ev, 0.0)
  rank = jnp.sum(ev > 0)
  total = jnp.sum(ev)
  ratio = jnp.cumsum(ev) / jnp.where(total > 0, total, 1.0)
  k = jnp.sum(ratio <= eta) + 1
  # Too few valid rows for a covariance (n_valid < 2) also gives rank 0.
  return jnp.minimum(k, rank).astype(jnp.int32) * (n_valid >= 2)


def pca_counts(h_PxNxD: jax.Array, eta: float, row_weight_PxN: jax.Array | None = None
               ) -> jax.Array:
  """`pca_count` of a stack of matrices (one batched eigendecomposition): int32[P]."""
  if row_weight_PxN is None:
    return jax.vmap(lambda h: pca_count(h, eta))(h_PxNxD)
  return jax.vmap(lambda h, w: pca_count(h, eta, w))(h_PxNxD, row_weight_PxN)
