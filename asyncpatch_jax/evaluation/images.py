"""The image convention of every metric here, checked once with errors that say what is wrong.

Images are [B, H, W, 3] (or [B, H, W, 1], taken as grey and repeated to RGB), either uint8 in
[0, 255] or floating point in [-1, 1] — the model range of `pixels`, x = u·2/255 - 1. Values
are checked on concrete arrays (not under a trace), with a slack of `RANGE_SLACK` for float error.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax import pixels

RANGE_SLACK = 1e-3


def check_images(images: Any, name: str = "images") -> None:
  """Raises ValueError unless `images` is [B, H, W, 1|3], uint8 or float in [-1, 1]."""
  if not hasattr(images, "dtype"):
    images = np.asarray(images)
  shape, dtype = np.shape(images), images.dtype
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"{name} must be [B, H, W, 3] (or [B, H, W, 1]) images, got shape {shape}")
  if shape[0] == 0:
    raise ValueError(f"{name} is an empty batch")
  if dtype != np.uint8 and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {dtype}")
  if dtype == np.uint8 or isinstance(images, jax.core.Tracer):
    return
  lo, hi = (float(v) for v in (jnp.min(images), jnp.max(images)))
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f"{name} has non-finite values")
  if lo < -1.0 - RANGE_SLACK or hi > 1.0 + RANGE_SLACK:
    hint = " (they look like [0, 255] pixels: pass uint8)" if hi > 2.0 else ""
    hint = hint or (" (they look like [0, 1]: map with 2x - 1)" if lo >= 0.0 else "")
    raise ValueError(f"float {name} must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def _as_rgb(x: jax.Array) -> jax.Array:
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def to_pixels(images: Any, quantize: bool = True) -> jax.Array:
  """float32 [B, H, W, 3] in [0, 255]; float inputs rounded to 8-bit values when `quantize`
  (`pixels.to_uint8`'s mapping, kept on the device and traceable for the jitted metrics)."""
  check_images(images)
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    return _as_rgb(x.astype(jnp.float32))
  x = jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  return _as_rgb(jnp.round(x) if quantize else x)


def to_model_range(images: Any) -> jax.Array:
  """float32 [B, H, W, 3] in [-1, 1] (uint8 u ↦ u·2/255 - 1)."""
  check_images(images)
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    return _as_rgb(pixels.to_model_range(x))
  return _as_rgb(jnp.clip(x.astype(jnp.float32), -1.0, 1.0))
