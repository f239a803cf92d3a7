"""Input guidance: push the unknown tokens toward what the clean context implies.

  x̂_g = x̂(z; context clean) + ω (x̂(z; context clean) − x̂(z̃; context re-noised to level k))

Two denoiser calls per evaluation: one with the known tokens clean at level 0, one where they are
re-noised to level k (fresh noise at every evaluation) and their level set to k. The difference
is what the context contributes beyond a blurred version of itself, so ω > 0 amplifies local
consistency with the context, like classifier-free guidance does for the class; a guided
denoiser (CFG inside) is simply called in both branches. Applied to the unknown tokens only; the
uncertainty is the clean branch's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from asyncpatch_jax.diffusion import Prediction, Schedule, expand_levels
from asyncpatch_jax.diffusion.level_map import PatchSize

Array = jax.Array
# Evaluates the denoiser at (z, levels) with a key for any noise it draws; returns the
# prediction and the number of denoiser calls made.
KeyedDenoiseFn = Callable[[Array, Array, Array], tuple[Prediction, Array]]
DEFAULT_GUIDANCE_LEVEL = 0.5


def renoise_context(z: Array, levels: Array, known: Array, known_mask: Array, noise: Array, *,
                    level: float, schedule: Schedule,
                    patch_size: PatchSize = 1) -> tuple[Array, Array]:
  """(z̃, t̃): the known tokens re-noised to `level`, the other tokens untouched."""
  mask_full = expand_levels(known_mask.astype(jnp.float32), z.shape, patch_size) > 0
  alpha, sigma = schedule.alpha_sigma(jnp.float32(level))
  z_tilde = jnp.where(mask_full, alpha * known + sigma * noise, z)
  return z_tilde, jnp.where(known_mask, jnp.float32(level), levels)


def input_guided(call: Callable[[Array, Array], Prediction], known: Array, known_mask: Array, *,
                 scale: float | Array, level: float = DEFAULT_GUIDANCE_LEVEL, schedule: Schedule,
                 patch_size: PatchSize = 1) -> KeyedDenoiseFn:
  """Wraps `call(z, levels) -> Prediction` into the input-guided denoise function (2 calls)."""
  if not 0.0 < level <= 1.0:
    raise ValueError(f"guidance_level must lie in (0, 1], got {level}")

  def denoise(z: Array, levels: Array, key: Array) -> tuple[Prediction, Array]:
    clean = call(z, levels)
    z_tilde, levels_tilde = renoise_context(
        z, levels, known, known_mask, jax.random.normal(key, z.shape, z.dtype), level=level,
        schedule=schedule, patch_size=patch_size)
    noisy = call(z_tilde, levels_tilde)
    mask_full = expand_levels(known_mask.astype(jnp.float32), z.shape, patch_size) > 0
    guided = clean.x0 + scale * (clean.x0 - noisy.x0)
    x0 = jnp.where(mask_full, clean.x0, guided)
    return Prediction(x0=x0, variance=clean.variance), jnp.int32(2)

  return denoise
