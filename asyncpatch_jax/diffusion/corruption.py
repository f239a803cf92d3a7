"""Asynchronous corruption q(z | x, t) = Π_i N(z_i; α(t_i) x_i, σ(t_i)²)."""

from __future__ import annotations

import jax

from asyncpatch_jax.diffusion.level_map import PatchSize, expand_levels
from asyncpatch_jax.diffusion.schedules import Schedule

Array = jax.Array


def corrupt(x0: Array, t: Array, noise: Array, schedule: Schedule,
            patch_size: PatchSize = 1) -> Array:
  """Noises each token of `x0` to its own level: z = α(t) x0 + σ(t) ε.

  Args:
    x0: clean data `[B, *spatial, C]`.
    t: level map `[B, *spatial/p]` in [0, 1].
    noise: standard normal ε, shaped like `x0`.
    schedule: the noise schedule.
    patch_size: token size along each spatial axis.
  """
  if noise.shape != x0.shape:
    raise ValueError(f"noise has shape {noise.shape} but x0 has shape {x0.shape}")
  alpha, sigma = schedule.alpha_sigma(expand_levels(t, x0.shape, patch_size))
  return alpha * x0 + sigma * noise
