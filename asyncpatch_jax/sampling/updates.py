"""Per-token update rules: move each token of z from its level t to its own level s ≤ t.

Every rule works elementwise on level maps expanded to the data shape, so one step can move some
tokens far, some a little and leave others where they are. Two conventions hold for all rules:

- a token with s = t is returned unchanged (bit-exact), so frozen and finished tokens stay put;
- a token reaching s = 0 becomes x̂0 exactly: level 0 means clean data, as for known context,
  even though the bounded schedule has σ(0) > 0.

Rules (with λ = log-SNR, c = 1 − SNR_t / SNR_s = −expm1(λ_t − λ_s) ∈ [0, 1)):
- `ancestral`: the per-token DDPM posterior q(z_s | z_t, x = x̂0),
  mean α_s/α_t (1 − c) z_t + c α_s x̂0, variance c σ_s² (VDM's form).
- `ddim`: deterministic, z_s = α_s x̂0 + σ_s ε̂ with ε̂ = (z_t − α_t x̂0)/σ_t; the first-order
  exponential integrator of the probability-flow ODE along the per-token path.
- `heun`: second order on the same ODE: a DDIM predictor, a second denoiser call at the
  predicted point, then the trapezoidal rule on x̂0 in the data-prediction form
  d(z/σ) = x̂0 d(α/σ): z_s = (σ_s/σ_t) z_t + α_s (1 − e^{−h}) (x̂0_t + x̂0_s)/2, h = ½(λ_s − λ_t)
  (per token). Exact when x̂0 is constant along the step; unlike EDM's Heun on ε in σ/α, it
  stays stable across the large first log-SNR step of a bounded schedule (from λ = −15).
  Tokens reaching level 0 take the DDIM (Euler) step, as in EDM.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from asyncpatch_jax.diffusion import Prediction, Schedule, expand_levels
from asyncpatch_jax.diffusion.level_map import PatchSize

Array = jax.Array
UPDATES = ("ancestral", "ddim", "heun")
# Evaluates the (possibly guided) denoiser at (z, levels); returns the prediction and the number
# of denoiser calls it made.
DenoiseFn = Callable[[Array, Array], tuple[Prediction, Array]]


def check_update(update: str) -> None:
  if update not in UPDATES:
    raise ValueError(f"unknown update {update!r}; choose one of {UPDATES}")


def _finish(z_s: Array, z: Array, x0: Array, t: Array, s: Array) -> Array:
  """Applies the two conventions: s == t keeps z, s == 0 gives x̂0."""
  return jnp.where(s >= t, z, jnp.where(s == 0, x0, z_s))


def ancestral_step(z: Array, t: Array, s: Array, x0: Array, noise: Array, *,
                   schedule: Schedule, patch_size: PatchSize = 1,
                   x0_variance: Array | None = None) -> Array:
  """One per-token DDPM posterior step z_t → z_s (levels `t`, `s`: `[B, *spatial/p]`).

  With `x0_variance` v (the uncertainty head's), x is integrated out over N(x̂0, diag v)
  instead of fixed at x̂0: the variance grows by (c α_s)² v, and a token reaching 0 becomes
  x̂0 + √v ε. For Gaussian data with a diagonal posterior this step is exact at any size.
  """
  t_full = expand_levels(t, z.shape, patch_size)
  s_full = expand_levels(s, z.shape, patch_size)
  lam_t, lam_s = schedule.log_snr(t_full), schedule.log_snr(s_full)
  alpha_t, _ = schedule.alpha_sigma(t_full)
  alpha_s, sigma_s = schedule.alpha_sigma(s_full)
  c = -jnp.expm1(jnp.minimum(lam_t - lam_s, 0.0))
  mean = (alpha_s / alpha_t) * (1.0 - c) * z + c * alpha_s * x0
  if x0_variance is None:
    return _finish(mean + sigma_s * jnp.sqrt(c) * noise, z, x0, t_full, s_full)
  var = c * jnp.square(sigma_s) + jnp.square(c * alpha_s) * x0_variance
  drawn = x0 + jnp.sqrt(x0_variance) * noise
  return _finish(mean + jnp.sqrt(var) * noise, z, drawn, t_full, s_full)


def ddim_step(z: Array, t: Array, s: Array, x0: Array, *, schedule: Schedule,
              patch_size: PatchSize = 1) -> Array:
  """One deterministic DDIM step z_t → z_s per token."""
  t_full = expand_levels(t, z.shape, patch_size)
  s_full = expand_levels(s, z.shape, patch_size)
  alpha_t, sigma_t = schedule.alpha_sigma(t_full)
  alpha_s, sigma_s = schedule.alpha_sigma(s_full)
  eps = (z - alpha_t * x0) / sigma_t
  return _finish(alpha_s * x0 + sigma_s * eps, z, x0, t_full, s_full)


def heun_step(z: Array, t: Array, s: Array, pred: Prediction, denoise_fn: DenoiseFn, *,
              schedule: Schedule, patch_size: PatchSize = 1) -> tuple[Array, Array, Array]:
  """One second-order Heun step z_t → z_s per token.

  The corrector's denoiser call is skipped (by `lax.cond`) when no token of the batch needs it,
  i.e. when every moving token goes straight to level 0, as on a uniform plan's last step.

  Returns:
    (z_s, calls, needed): the new state, the number of denoiser calls made by the corrector
    (0 when skipped), and `[B]` whether each example needed the corrector.
  """
  x0 = pred.x0
  z_pred = ddim_step(z, t, s, x0, schedule=schedule, patch_size=patch_size)
  token_axes = tuple(range(1, t.ndim))
  needed = jnp.any((s > 0) & (s < t), axis=token_axes)

  def corrector(_):
    pred2, calls = denoise_fn(z_pred, s)
    return pred2.x0, jnp.asarray(calls, jnp.int32)

  def skip(_):
    return x0, jnp.zeros((), jnp.int32)

  x0_2, calls = jax.lax.cond(jnp.any(needed), corrector, skip, None)
  t_full = expand_levels(t, z.shape, patch_size)
  s_full = expand_levels(s, z.shape, patch_size)
  lam_t, lam_s = schedule.log_snr(t_full), schedule.log_snr(s_full)
  _, sigma_t = schedule.alpha_sigma(t_full)
  alpha_s, sigma_s = schedule.alpha_sigma(s_full)
  decay = jnp.exp(-0.5 * jnp.maximum(lam_s - lam_t, 0.0))  # e^{−h} = (σ_s/α_s) / (σ_t/α_t)
  z_s = (sigma_s / sigma_t) * z + alpha_s * (1.0 - decay) * 0.5 * (x0 + x0_2)
  z_s = jnp.where(s_full > 0, z_s, z_pred)
  return _finish(z_s, z, x0, t_full, s_full), calls, needed
