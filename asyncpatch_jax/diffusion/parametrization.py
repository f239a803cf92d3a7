"""The denoiser protocol and conversions between the x0, ε and v parametrisations.

A *denoiser* is any callable `denoiser(z, t) -> x0_hat` or `-> Prediction(x0, variance)`, where
`z` is `[B, *spatial, C]`, `t` the level map `[B, *spatial/p]`, and `variance` the predicted
per-element squared error of `x0_hat` (the uncertainty). Losses, the ELBO and every sampler take
a denoiser, so an analytic denoiser, a trained network or a guided wrapper plug in alike.

With z = α x0 + σ ε:  ε = (z − α x0)/σ,  x0 = (z − σ ε)/α,  v = α ε − σ x0,  x0 = α z − σ v.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from asyncpatch_jax.diffusion.level_map import PatchSize, expand_levels
from asyncpatch_jax.diffusion.schedules import Schedule

Array = jax.Array
PARAMETRIZATIONS = ("eps", "x0", "v")


class Prediction(NamedTuple):
  """What a denoiser returns: the clean estimate and, optionally, its per-element variance."""

  x0: Array
  variance: Array | None = None


def as_prediction(out: Array | Prediction) -> Prediction:
  """Normalises a denoiser's return value to a `Prediction`."""
  if isinstance(out, Prediction):
    return out
  if isinstance(out, tuple):
    raise TypeError("a denoiser must return an array or a `Prediction`, not a plain tuple")
  return Prediction(x0=out)


def check_parametrization(parametrization: str) -> None:
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"unknown parametrization {parametrization!r}; choose one of "
                     f"{PARAMETRIZATIONS}")


def x0_from_eps(z: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  return (z - sigma * eps) / alpha


def eps_from_x0(z: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
  return (z - alpha * x0) / sigma


def x0_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
  return alpha * z - sigma * v


def v_from_x0(z: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
  return alpha * eps_from_x0(z, x0, alpha, sigma) - sigma * x0


def to_x0(output: Array, z: Array, alpha: Array, sigma: Array, parametrization: str) -> Array:
  """Converts a network output in `parametrization` to an x0 estimate."""
  check_parametrization(parametrization)
  if parametrization == "x0":
    return output
  if parametrization == "eps":
    return x0_from_eps(z, output, alpha, sigma)
  return x0_from_v(z, output, alpha, sigma)


def from_x0(x0: Array, z: Array, alpha: Array, sigma: Array, parametrization: str) -> Array:
  """Converts an x0 estimate to `parametrization` (the inverse of `to_x0`)."""
  check_parametrization(parametrization)
  if parametrization == "x0":
    return x0
  if parametrization == "eps":
    return eps_from_x0(z, x0, alpha, sigma)
  return v_from_x0(z, x0, alpha, sigma)


def target(x0: Array, noise: Array, alpha: Array, sigma: Array, parametrization: str) -> Array:
  """The regression target of a network trained in `parametrization`."""
  check_parametrization(parametrization)
  if parametrization == "x0":
    return x0
  if parametrization == "eps":
    return noise
  return alpha * noise - sigma * x0


def log_x0_error_scale(log_snr: Array, parametrization: str) -> Array:
  """log c² where ‖x̂0 − x0‖² = c² ‖output − target‖² in `parametrization`."""
  check_parametrization(parametrization)
  if parametrization == "x0":
    return jnp.zeros_like(log_snr)
  if parametrization == "eps":
    return -log_snr  # σ²/α²
  return jax.nn.log_sigmoid(-log_snr)  # σ²


def to_prediction(output: Array, z: Array, t: Array, *, schedule: Schedule,
                  parametrization: str, patch_size: PatchSize = 1,
                  log_variance: Array | None = None) -> Prediction:
  """Turns a network's raw output (and optional log-variance head) into a `Prediction`."""
  alpha, sigma = schedule.alpha_sigma(expand_levels(t, z.shape, patch_size))
  x0 = to_x0(output, z, alpha, sigma, parametrization)
  variance = None if log_variance is None else jnp.exp(log_variance)
  return Prediction(x0=x0, variance=variance)
