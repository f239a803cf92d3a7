"""The negative ELBO along a monotone path of per-token levels (METHOD.md, "ELBO").

For a path τ: [0, 1] → [0, 1]^N (every coordinate non-decreasing, τ(0) = 0, τ(1) = 1):

  −ELBO_τ = E[−log p(x | z(0))] + KL(q(z(1) | x) ‖ N(0, I))
            + ½ ∫₀¹ Σ_i (−d/ds SNR(τ_i(s))) E‖x_i − x̂_i(z(s), τ(s))‖² ds.

Each coordinate is a time-changed 1-D diffusion, so frozen coordinates (τ_i' = 0) contribute
nothing and the homogeneous path τ_i(s) = s is VDM's continuous-time ELBO. The integral is
estimated with stratified s (a uniform offset per example, one sample per stratum), and
d/ds SNR(τ(s)) = SNR · λ'(τ) · τ'(s) with τ'(s) from `jax.jvp` and λ' in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion.corruption import corrupt
from asyncpatch_jax.diffusion.level_map import PatchSize, token_grid, tokens_sum
from asyncpatch_jax.diffusion.parametrization import as_prediction
from asyncpatch_jax.diffusion.paths import Path, check_path
from asyncpatch_jax.diffusion.schedules import Schedule

Array = jax.Array
DATA_KINDS = ("continuous", "discrete8bit")


def diffusion_integrand(denoiser: Callable, x0: Array, s: Array, noise: Array, *,
                        schedule: Schedule, path: Path, patch_size: PatchSize = 1) -> Array:
  """½ Σ_i (−d/ds SNR(τ_i(s))) ‖x_i − x̂_i(z(s), τ(s))‖² per example.

  `s` is a scalar or one value per example `[B]`; `noise` is the ε of z(s).
  """
  grid = token_grid(x0.shape, patch_size)
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x0.shape[0],))
  s = s.reshape((-1,) + (1,) * (len(grid) - 1))  # [B, 1, ..., 1]: broadcasts against the grid
  tau, dtau = jax.jvp(lambda u: jnp.broadcast_to(path(u), grid), (s,), (jnp.ones_like(s),))
  z = corrupt(x0, tau, noise, schedule, patch_size)
  x0_hat = as_prediction(denoiser(z, tau)).x0
  sq_err = tokens_sum(jnp.square(x0.astype(jnp.float32) - x0_hat), patch_size)
  # −d/ds SNR(τ(s)) = −exp(λ(τ)) λ'(τ) τ'(s) ≥ 0; frozen tokens (τ' = 0) contribute nothing.
  neg_dsnr = -jnp.exp(schedule.log_snr(tau)) * schedule.dlog_snr_dt(tau) * dtau
  neg_dsnr = jnp.where(dtau > 0, neg_dsnr, 0.0)
  return 0.5 * (neg_dsnr * sq_err).reshape(x0.shape[0], -1).sum(-1)


def prior_kl(x0: Array, schedule: Schedule) -> Array:
  """KL(q(z(1) | x) ‖ N(0, I)) per example, in nats (every token at level 1)."""
  alpha, sigma = schedule.alpha_sigma(jnp.ones((), jnp.float32))
  kl = 0.5 * (jnp.square(alpha * x0) + jnp.square(sigma) - 1.0 - 2.0 * jnp.log(sigma))
  return kl.reshape(x0.shape[0], -1).sum(-1)


def reconstruction_nll(x0: Array, rng: Array, schedule: Schedule, data: str) -> Array:
  """E[−log p(x | z(0))] per example, in nats (every token at level 0).

  'continuous': the Gaussian decoder N(x; z0/α0, σ0²/α0²), whose expectation is closed-form.
  'discrete8bit': VDM's decoder over the 256 values 2k/255 − 1 with logits
  −½ ((z0/α0 − x_k) α0/σ0)², estimated with one sample of z0.
  """
  alpha, sigma = schedule.alpha_sigma(jnp.zeros((), jnp.float32))
  num = math.prod(x0.shape[1:])
  if data == "continuous":
    per_elem = 0.5 * (1.0 + jnp.log(2.0 * jnp.pi)) + jnp.log(sigma / alpha)
    return jnp.full((x0.shape[0],), per_elem * num)
  z0 = alpha * x0 + sigma * jax.random.normal(rng, x0.shape)
  values = 2.0 * jnp.arange(256, dtype=jnp.float32) / 255.0 - 1.0
  logits = -0.5 * jnp.square((z0[..., None] / alpha - values) * (alpha / sigma))
  k = jnp.clip(jnp.round((x0 + 1.0) * 127.5), 0, 255).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), k[..., None], -1)[..., 0]
  return -logp.reshape(x0.shape[0], -1).sum(-1)


def _check_discrete(x0: Array) -> None:
  if isinstance(x0, jax.core.Tracer):
    return
  v = np.asarray(x0, np.float64)
  k = np.round((v + 1.0) * 127.5)
  if v.min() < -1 - 1e-6 or v.max() > 1 + 1e-6 or np.abs(k / 127.5 - 1.0 - v).max() > 1e-3:
    raise ValueError("data='discrete8bit' needs x0 on the 8-bit grid 2k/255 − 1 (images scaled "
                     "as uint8 / 127.5 − 1); use data='continuous' for other data")


def nelbo(denoiser: Callable, x0: Array, rng: Array, *, schedule: Schedule, path: Path,
          num_steps: int, patch_size: PatchSize = 1,
          data: str = "continuous") -> dict[str, Array]:
  """The negative ELBO of each example along `path`, in nats, and bits per dimension.

  Args:
    denoiser: `(z, t) -> x0_hat | Prediction`.
    x0: data `[B, *spatial, C]` (in [-1, 1] for images).
    rng: randomness for s, the noise and the decoder.
    path: `s -> level map`, see `asyncpatch_jax.diffusion.paths`.
    num_steps: number of strata in s (one network evaluation each).
    data: 'continuous' (Gaussian decoder, density) or 'discrete8bit' (probability mass).

  Returns:
    Per-example `[B]` arrays 'diffusion', 'prior', 'recon', 'total' (nats) and 'bpd', plus the
    'log_snr_min' / 'log_snr_max' the integral runs between.
  """
  if data not in DATA_KINDS:
    raise ValueError(f"unknown data kind {data!r}; choose one of {DATA_KINDS}")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
  grid = token_grid(x0.shape, patch_size)
  check_path(path, grid)
  if data == "discrete8bit":
    _check_discrete(x0)
  x0 = jnp.asarray(x0, jnp.float32)
  k_offset, k_noise, k_recon = jax.random.split(rng, 3)
  offset = jax.random.uniform(k_offset, (x0.shape[0],))

  def step(total, j):
    s = (j + offset) / num_steps
    noise = jax.random.normal(jax.random.fold_in(k_noise, j), x0.shape)
    return total + diffusion_integrand(denoiser, x0, s, noise, schedule=schedule, path=path,
                                       patch_size=patch_size), None

  total, _ = jax.lax.scan(step, jnp.zeros((x0.shape[0],), jnp.float32),
                          jnp.arange(num_steps, dtype=jnp.float32))
  out = {
      "diffusion": total / num_steps,
      "prior": prior_kl(x0, schedule),
      "recon": reconstruction_nll(x0, k_recon, schedule, data),
  }
  out["total"] = out["diffusion"] + out["prior"] + out["recon"]
  out["bpd"] = out["total"] / (math.prod(x0.shape[1:]) * math.log(2.0))
  out["log_snr_min"] = jnp.full((x0.shape[0],), schedule.log_snr_min, jnp.float32)
  out["log_snr_max"] = jnp.full((x0.shape[0],), schedule.log_snr_max, jnp.float32)
  return out
