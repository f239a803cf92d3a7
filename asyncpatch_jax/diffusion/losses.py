"""The training loss: weighted per-element regression plus the uncertainty head's Gaussian NLL.

The error is computed in the network's own parametrisation (its native target), then weighted so
that it equals `w(t) ‖x̂0 − x0‖²` for the chosen weighting. Weights per element, with λ = log-SNR:

  'x0': 1    'eps': SNR (ε-MSE)    'v': 1 + SNR (v-MSE)    'elbo': −½ dSNR/dt (VDM's weighting)

Combining them in log space keeps, for instance, ε-MSE of an ε-network exact at t → 0, where SNR
is ~1e6 and a detour through x̂0 would amplify round-off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from asyncpatch_jax.diffusion import parametrization as param
from asyncpatch_jax.diffusion.level_map import PatchSize, check_level_shape, expand_levels
from asyncpatch_jax.diffusion.schedules import Schedule

Array = jax.Array
WEIGHTINGS = ("eps", "x0", "v", "elbo")


def log_weight(t: Array, schedule: Schedule, weighting: str) -> Array:
  """log w(t) of the per-element ‖x̂0 − x0‖² weight (see module docstring)."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
  lam = schedule.log_snr(t)
  if weighting == "x0":
    return jnp.zeros_like(lam)
  if weighting == "eps":
    return lam
  if weighting == "v":
    return jax.nn.softplus(lam)
  return lam + jnp.log(-schedule.dlog_snr_dt(t)) - jnp.log(2.0)


def diffusion_loss(output: Array, x0: Array, noise: Array, t: Array, *, schedule: Schedule,
                   parametrization: str = "eps", weighting: str | None = None,
                   patch_size: PatchSize = 1, log_variance: Array | None = None,
                   variance_weight: float = 0.01,
                   loss_mask: Array | None = None) -> dict[str, Array]:
  """Per-example training losses for one corrupted batch z = α(t) x0 + σ(t) ε.

  Args:
    output: the network output `[B, *spatial, C]` in `parametrization`.
    x0, noise: the clean data and the ε used to corrupt it.
    t: the level map `[B, *spatial/p]` the batch was corrupted with.
    weighting: one of WEIGHTINGS; defaults to the parametrisation's own MSE.
    log_variance: optional per-element log of the predicted squared error of x̂0.
    variance_weight: the NLL term's factor (0.01 in the paper's recipe).
    loss_mask: token-level `[B, *spatial/p]` weights; defaults to `t > 0`, since tokens held
      clean as context carry no learnable target.

  Returns:
    'loss' (the objective), 'mse' (the weighted regression term) and 'nll', each `[B]`: means
    over the counted elements of each example (0 for an example with none).
  """
  parametrization = str(parametrization)
  param.check_parametrization(parametrization)
  weighting = parametrization if weighting is None else weighting
  for name, a in (("output", output), ("noise", noise)):
    if a.shape != x0.shape:
      raise ValueError(f"`{name}` has shape {a.shape} but x0 has shape {x0.shape}")
  check_level_shape(t, x0.shape, patch_size)
  if loss_mask is None:
    loss_mask = t > 0
  check_level_shape(loss_mask, x0.shape, patch_size, name="loss_mask")

  t_full = expand_levels(t, x0.shape, patch_size)
  mask = expand_levels(loss_mask.astype(jnp.float32), x0.shape, patch_size)
  lam = schedule.log_snr(t_full)
  alpha, sigma = schedule.alpha_sigma(t_full)

  err = output - param.target(x0, noise, alpha, sigma, parametrization)
  log_c2 = param.log_x0_error_scale(lam, parametrization)
  log_w = log_weight(t_full, schedule, weighting) + log_c2
  mse_el = jnp.exp(log_w) * jnp.square(err)

  axes = tuple(range(1, x0.ndim))
  count = jnp.maximum(mask.sum(axes), 1.0)
  mse = (mse_el * mask).sum(axes) / count
  nll = jnp.zeros_like(mse)
  if log_variance is not None:
    if log_variance.shape != x0.shape:
      raise ValueError(f"`log_variance` has shape {log_variance.shape} but x0 has shape "
                       f"{x0.shape}")
    # Squared error of x̂0 against the stop-gradient mean: ‖x̂0 − x0‖² = c² ‖err‖².
    x0_sq_err = jax.lax.stop_gradient(jnp.exp(log_c2) * jnp.square(err))
    nll_el = 0.5 * (log_variance + x0_sq_err * jnp.exp(-log_variance))
    nll = (nll_el * mask).sum(axes) / count
  return {"loss": mse + variance_weight * nll, "mse": mse, "nll": nll}

