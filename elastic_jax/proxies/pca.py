"""The PCA count at the heart of W-PCA, jittable and batched.

`pca_count(h_NxD, eta)` is the number of principal components of the rows of `h_NxD` (N samples of
D features) whose cumulative explained-variance ratio first *exceeds* `eta`:

  1. centre every column with the mean over the valid rows (`row_weight_N` 1 = valid, 0 = left
     out; left-out rows are zeroed after centring, so they add nothing);
  2. the scatter matrix X^T X (D x D), or, when N < D, the Gram matrix X X^T (N x N), which has
     the same non-zero eigenvalues and is cheaper (the choice is static, from the shapes);
  3. its eigenvalues in descending order; k = the smallest k with
     sum(lambda_1..k) / sum(lambda) > eta.

`pca_count_linear(x_NxD, kernel_DxF, eta)` is the same count for h = x @ kernel + bias (an FFN's
first linear), computed without forming h: centring removes the bias and the scatter matrix of h
is kernel^T (X^T X) kernel. For N tokens, hidden width D and FFN width F that costs N D^2 + D^2 F
+ D F^2 multiply-adds instead of N F^2 (F is typically 2-4x D), and when F > D the
decomposition shrinks to D x D (see `linear_count`). It is what W-PCA uses.

The eigenvalues of the (positive semi-definite) scatter matrix come from the solver that is
fastest on the platform (`descending_eigenvalues`): on CPU its singular values, computed
values-only; on GPU and TPU `eigvalsh`.

Numerics (float32). Columns are first shifted by one valid row, then centred (the shifted-data
algorithm), so a column that is constant over the valid rows (all-zero masked FFN columns
included) becomes exactly zero: rounding in its mean cannot invent variance. The matrix is scaled
to mean eigenvalue 1 (the count is scale-free). Eigenvalues at or below
`tol = max(N_valid, D_varying) * eps32 * lambda_max` are solver noise (NumPy's `matrix_rank`
tolerance) and are set to zero before the cumulative sum; `D_varying` counts the columns with
non-zero variance, so appending zero columns (a masked FFN) changes neither the tolerance nor any
eigenvalue above it. k never exceeds the number of eigenvalues above `tol` (the numerical rank),
and is 0 when no column varies (zero total variance). The count is exact against a float64
reference except when a cumulative ratio lies within float32 rounding (~1e-6) of `eta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elastic_jax import parallel

_EPS32 = float(jnp.finfo(jnp.float32).eps)


def centred(h_NxD: jax.Array, row_weight_N: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """(rows centred over the valid rows, left-out rows zeroed; number of valid rows)."""
  h_NxD = h_NxD.astype(jnp.float32)
  if row_weight_N is None:
    w_N = jnp.ones(h_NxD.shape[:1], jnp.float32)
  else:
    w_N = (row_weight_N > 0).astype(jnp.float32)
  n_valid = jnp.sum(w_N)
  # Centre on a valid row first (the shifted-data algorithm): a constant column then becomes
  # exactly zero, so rounding in its mean cannot invent variance.
  x_NxD = h_NxD - h_NxD[jnp.argmax(w_N)]
  mean_D = jnp.sum(x_NxD * w_N[:, None], axis=0) / jnp.maximum(n_valid, 1.0)
  return (x_NxD - mean_D) * w_N[:, None], n_valid


def _singular_values(m):
  return jnp.linalg.svd(m, compute_uv=False)


def _eigvalsh_descending(m):
  return jnp.linalg.eigvalsh(m)[..., ::-1]


def descending_eigenvalues(m_DxD: jax.Array) -> jax.Array:
  """Eigenvalues of a symmetric positive semi-definite matrix, in descending order.

  On CPU its singular values, computed values-only (JAX's CPU `eigvalsh` also computes the
  eigenvectors); elsewhere `eigvalsh`, whose batched GPU solver is ~100x faster than the GPU SVD
  at these sizes (H100: 96 matrices of 128 x 128 in 1.3 ms against 228 ms). Both return the
  same values up to solver rounding (tested)."""
  return jax.lax.platform_dependent(m_DxD, cpu=_singular_values, default=_eigvalsh_descending)


def count_from_scatter(m_DxD: jax.Array, n_valid: jax.Array, varying: jax.Array,
                       eta: float) -> jax.Array:
  """The PCA count from a scatter (or Gram) matrix of `n_valid` centred rows, `varying` of whose
  columns have non-zero variance: int32."""
  # Scale-free: normalise to mean eigenvalue 1, which keeps the solver's arithmetic far from
  # float32's subnormal range whatever the scale of the activations.
  scale = jnp.trace(m_DxD) / m_DxD.shape[0]
  m_DxD = m_DxD / jnp.where(scale > 0, scale, 1.0)
  ev = descending_eigenvalues(0.5 * (m_DxD + m_DxD.T))
  dims = jnp.maximum(n_valid, varying)
  tol = dims * _EPS32 * ev[0]
  ev = jnp.where(ev > tol, ev, 0.0)
  rank = jnp.sum(ev > 0)
  total = jnp.sum(ev)
  ratio = jnp.cumsum(ev) / jnp.where(total > 0, total, 1.0)
  k = jnp.sum(ratio <= eta) + 1
  # Too few valid rows for a covariance (n_valid < 2) also gives rank 0.
  return jnp.minimum(k, rank).astype(jnp.int32) * (n_valid >= 2)


def pca_count(h_NxD: jax.Array, eta: float, row_weight_N: jax.Array | None = None) -> jax.Array:
  """int32 number of principal components explaining more than `eta` of the variance.

  Args:
    h_NxD: N samples (tokens) of D features (e.g. one FFN layer's pre-activations).
    eta: explained-variance threshold in (0, 1) (validated by the caller's config).
    row_weight_N: 1 for rows to use, 0 for rows to leave out (padding); None = all rows.
  """
  n, d = h_NxD.shape
  x_NxD, n_valid = centred(h_NxD, row_weight_N)
  if n < d:
    m = jnp.einsum('ND,MD->NM', x_NxD, x_NxD)
    varying = jnp.sum(jnp.sum(x_NxD * x_NxD, axis=0) > 0)
  else:
    m = jnp.einsum('ND,NE->DE', x_NxD, x_NxD)
    varying = jnp.sum(jnp.diagonal(m) > 0)
  return count_from_scatter(m, n_valid, varying, eta)


def linear_count(scatter_DxD: jax.Array, n_valid: jax.Array, kernel_DxF: jax.Array,
                 eta: float, *, factor_kernel: bool = False) -> jax.Array:
  """The PCA count of x @ kernel (+ any bias) from the scatter matrix S of centred x: int32.

  The pre-activations' scatter matrix is K^T S K (F x F). When F > D it has rank <= D, and its
  non-zero eigenvalues are those of the D x D matrix R K K^T R^T for any R with S = R^T R (here
  R = Lambda^1/2 V^T from S's eigendecomposition), which is cheaper to decompose.

  `factor_kernel` (F > D): the D x D matrix is L^T S L for the Cholesky factor L L^T = K K^T
  instead (the same non-zero eigenvalues: those of X K K^T X^T), so one count takes one
  symmetric eigendecomposition instead of two, and D^3-sized products instead of D^2 F ones
  (1.6x faster for D = 768, F = 3,072 on this CPU; on TPU the eigendecompositions dominate). It
  needs K K^T non-singular (a full-rank kernel): a rank-deficient one (zero columns padding a
  masked FFN beyond D active units, an all-zero kernel) falls back to S's eigendecomposition,
  chosen at run time. Only where a `lax.cond` runs one side: not under `vmap`, which would run
  both.
  """
  # On a mesh the products split over the FFN axis (each device its own columns; only the D x D
  # or F x F results are summed): the kernel comes replicated, gathered for the forward pass.
  kernel_DxF = parallel.spread(kernel_DxF.astype(jnp.float32), 1)
  d, f = kernel_DxF.shape
  if f <= d:
    m = kernel_DxF.T @ (scatter_DxD @ kernel_DxF)
    return count_from_scatter(m, n_valid, jnp.sum(jnp.diagonal(m) > 0), eta)
  scatter_DxD = 0.5 * (scatter_DxD + scatter_DxD.T)

  def by_scatter_factor(_):
    lam_D, v_DxD = jnp.linalg.eigh(scatter_DxD)
    rk_DxF = (v_DxD * jnp.sqrt(jnp.maximum(lam_D, 0.0))).T @ kernel_DxF
    varying = jnp.sum(jnp.sum(rk_DxF * rk_DxF, axis=0) > 0)  # = non-zero diagonal of K^T S K
    return count_from_scatter(rk_DxF @ rk_DxF.T, n_valid, varying, eta)

  if not factor_kernel:
    return by_scatter_factor(None)
  gram_DxD = kernel_DxF @ kernel_DxF.T
  l_DxD = jnp.linalg.cholesky(0.5 * (gram_DxD + gram_DxD.T))

  def by_kernel_factor(_):
    # Columns that can vary: the kernel's non-zero ones, when x varies at all (a column whose
    # pre-activation is constant although x varies needs x's variation orthogonal to it; the
    # count only uses this for its noise tolerance).
    varying = jnp.sum(jnp.any(kernel_DxF != 0, axis=0)) * (jnp.trace(scatter_DxD) > 0)
    return count_from_scatter(l_DxD.T @ (scatter_DxD @ l_DxD), n_valid, varying, eta)

  return jax.lax.cond(jnp.all(jnp.isfinite(l_DxD)), by_kernel_factor, by_scatter_factor, None)


def input_scatter(x_NxD: jax.Array, row_weight_N: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(scatter matrix X^T X of the centred valid rows, number of valid rows)."""
  x_NxD, n_valid = centred(x_NxD, row_weight_N)
  return jnp.einsum('ND,NE->DE', x_NxD, x_NxD), n_valid


def pca_count_linear(x_NxD: jax.Array, kernel_DxF: jax.Array, eta: float,
                     row_weight_N: jax.Array | None = None, *,
                     factor_kernel: bool = False) -> jax.Array:
  """`pca_count(x_NxD @ kernel_DxF + bias, eta, row_weight_N)` without forming the product
  (`factor_kernel`: see `linear_count`)."""
  scatter_DxD, n_valid = input_scatter(x_NxD, row_weight_N)
  return linear_count(scatter_DxD, n_valid, kernel_DxF, eta, factor_kernel=factor_kernel)


def pca_counts(h_PxNxD: jax.Array, eta: float, row_weight_PxN: jax.Array | None = None
               ) -> jax.Array:
  """`pca_count` of a stack of matrices (one batched decomposition): int32[P]."""
  if row_weight_PxN is None:
    return jax.vmap(lambda h: pca_count(h, eta))(h_PxNxD)
  return jax.vmap(lambda h, w: pca_count(h, eta, w))(h_PxNxD, row_weight_PxN)
