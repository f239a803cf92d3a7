"""An exact denoiser for Gaussian data: the reference every sampler is tested against.

For x ~ N(μ, Σ) (flattened over `[*spatial, C]`) and a per-token level map, the corrupted
z = A x + n with A = diag(α(t)), n ~ N(0, diag(σ(t)²)) is jointly Gaussian with x, so

  E[x | z]   = μ + Σ A (A Σ A + N)⁻¹ (z − A μ),
  Cov[x | z] = Σ − Σ A (A Σ A + N)⁻¹ A Σ.

This is the precision form P⁻¹(Σ⁻¹μ + A N⁻¹ z) with P = Σ⁻¹ + A N⁻¹ A, rewritten so that clean
tokens (level 0: α = 1, σ = 0 exactly, the sampler's convention) need no infinite SNR. The
posterior variance's diagonal is the exact per-element squared error of x̂0, i.e. a perfect
uncertainty head.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import Prediction, Schedule, expand_levels
from asyncpatch_jax.diffusion.level_map import PatchSize

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDenoiser:
  """`denoiser(z, t) -> Prediction(E[x|z], diag Cov[x|z])` for x ~ N(mean, cov).

  Attributes:
    mean: `[D]`, D = prod(spatial) · C, in the row-major order of `x[b].reshape(-1)`.
    cov: `[D, D]` symmetric positive definite.
    schedule: the noise schedule the levels refer to.
    patch_size: token size along each spatial axis.
  """

  mean: np.ndarray
  cov: np.ndarray
  schedule: Schedule
  patch_size: PatchSize = 1

  def __post_init__(self):
    mean = np.asarray(self.mean, np.float64).reshape(-1)
    cov = np.asarray(self.cov, np.float64)
    if cov.shape != (mean.size, mean.size):
      raise ValueError(f"cov has shape {cov.shape} but mean has {mean.size} elements")
    if not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() <= 0:
      raise ValueError("cov must be symmetric positive definite")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "cov", cov)

  def __call__(self, z: Array, t: Array) -> Prediction:
    batch, size = z.shape[0], math.prod(z.shape[1:])
    if size != self.mean.size:
      raise ValueError(f"z has {size} elements per example but the Gaussian has {self.mean.size}")
    levels = expand_levels(t, z.shape, self.patch_size).reshape(batch, size)
    alpha, sigma = self.schedule.alpha_sigma(levels)
    clean = levels == 0
    alpha = jnp.where(clean, 1.0, alpha)
    noise_var = jnp.where(clean, 0.0, jnp.square(sigma))
    mu = jnp.asarray(self.mean, jnp.float32)
    cov = jnp.asarray(self.cov, jnp.float32)
    # M = A Σ A + N, K = Σ A; E[x|z] = μ + K M⁻¹ (z − A μ); Var = diag(Σ) − diag(K M⁻¹ Kᵀ).
    gain_t = alpha[:, :, None] * cov[None]  # A Σ = Kᵀ, [B, D, D]
    m = gain_t * alpha[:, None, :] + jax.vmap(jnp.diag)(noise_var)
    chol = cholesky(m)
    resid = z.reshape(batch, size).astype(jnp.float32) - alpha * mu
    w = solve_lower(chol, gain_t)  # L⁻¹ A Σ
    v = solve_lower(chol, resid[..., None])  # L⁻¹ r
    x0 = mu + jnp.einsum("bji,bjk->bi", w, v)
    variance = jnp.maximum(jnp.diag(cov) - jnp.sum(jnp.square(w), axis=1), 0.0)
    return Prediction(x0=x0.reshape(z.shape), variance=variance.reshape(z.shape))


def cholesky(m: Array) -> Array:
  """Lower Cholesky factor of a batch of SPD matrices `[B, D, D]`, in plain JAX ops.

  Not `jnp.linalg.cholesky`: on CPU that calls LAPACK (scipy's OpenBLAS), which can deadlock
  when XLA runs two independent calls concurrently (the two branches of input guidance, or the
  shards of a multi-device CPU run). A column-by-column `fori_loop` is cheap at test sizes.
  """
  size = m.shape[-1]
  index = jnp.arange(size)

  def column(j, chol):
    row = jax.lax.dynamic_index_in_dim(chol, j, axis=1, keepdims=False)  # [B, D], zero at k >= j
    diag = jnp.sqrt(jax.lax.dynamic_index_in_dim(
        jax.lax.dynamic_index_in_dim(m, j, axis=1, keepdims=False), j, axis=1,
        keepdims=False) - jnp.sum(jnp.square(row), axis=-1))
    m_col = jax.lax.dynamic_index_in_dim(m, j, axis=2, keepdims=False)
    col = (m_col - jnp.einsum("bik,bk->bi", chol, row)) / diag[:, None]
    col = jnp.where(index > j, col, jnp.where(index == j, diag[:, None], 0.0))
    return jnp.where(index[None, None, :] == j, col[:, :, None], chol)

  return jax.lax.fori_loop(0, size, column, jnp.zeros_like(m))


def solve_lower(chol: Array, b: Array) -> Array:
  """L⁻¹ b for lower-triangular `chol` `[B, D, D]` and `b` `[B, D, K]` (forward substitution)."""
  size = chol.shape[-1]
  index = jnp.arange(size)

  def row(i, y):
    l_row = jax.lax.dynamic_index_in_dim(chol, i, axis=1, keepdims=False)  # [B, D]
    l_ii = jax.lax.dynamic_index_in_dim(l_row, i, axis=1, keepdims=False)  # [B]
    b_i = jax.lax.dynamic_index_in_dim(b, i, axis=1, keepdims=False)  # [B, K]
    y_i = (b_i - jnp.einsum("bd,bdk->bk", l_row, y)) / l_ii[:, None]
    return jnp.where((index == i)[None, :, None], y_i[:, None, :], y)

  return jax.lax.fori_loop(0, size, row, jnp.zeros_like(b))


def gaussian_conditional(mean: np.ndarray, cov: np.ndarray, known_index: np.ndarray,
                         known_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of the unknown elements given the known ones (float64, numpy).

  Args:
    mean, cov: the Gaussian over D elements.
    known_index: boolean `[D]`, True where the element is known.
    known_values: `[D]` (only the known entries are read).

  Returns:
    (mean_u, cov_uu) over the elements with `known_index == False`, in order.
  """
  mean = np.asarray(mean, np.float64).reshape(-1)
  cov = np.asarray(cov, np.float64)
  k = np.asarray(known_index, bool).reshape(-1)
  u = ~k
  x_k = np.asarray(known_values, np.float64).reshape(-1)[k]
  gain = np.linalg.solve(cov[np.ix_(k, k)], cov[np.ix_(k, u)]).T  # Σ_uk Σ_kk⁻¹
  mean_u = mean[u] + gain @ (x_k - mean[k])
  cov_uu = cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]
  return mean_u, cov_uu


def gaussian_kl(mean_p: np.ndarray, cov_p: np.ndarray, mean_q: np.ndarray,
                cov_q: np.ndarray) -> float:
  """KL(N(mean_p, cov_p) ‖ N(mean_q, cov_q)) in nats (float64)."""
  mean_p, mean_q = (np.asarray(m, np.float64).reshape(-1) for m in (mean_p, mean_q))
  cov_p, cov_q = np.asarray(cov_p, np.float64), np.asarray(cov_q, np.float64)
  d = mean_p.size
  diff = mean_q - mean_p
  trace = np.trace(np.linalg.solve(cov_q, cov_p))
  maha = diff @ np.linalg.solve(cov_q, diff)
  logdet = np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1]
  return float(0.5 * (trace + maha - d + logdet))


def smooth_covariance(num_elements: int, length_scale: float = 2.0, nugget: float = 0.05,
                      scale: float = 1.0) -> np.ndarray:
  """A correlated test covariance on a 1-D grid: squared-exponential kernel plus a nugget."""
  pos = np.arange(num_elements, dtype=np.float64)
  dist2 = np.square(pos[:, None] - pos[None, :])
  return scale * ((1 - nugget) * np.exp(-0.5 * dist2 / length_scale**2) + nugget * np.eye(
      num_elements))
