"""The one pixel convention: uint8 [0, 255] on disk and in the data sets, x = u·2/255 − 1 in
[−1, 1] for the model, and back with rounding and clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def to_model_range(images: Any) -> Any:
  """uint8 [0, 255] → float32 [−1, 1]; NumPy in, NumPy out, JAX (or a tracer) in, JAX out."""
  xp = jnp if isinstance(images, jax.Array) else np
  return xp.asarray(images, xp.float32) * (2.0 / 255.0) - 1.0


def to_uint8(images: Any) -> np.ndarray:
  """[−1, 1] → uint8 [0, 255] on the host (clipped and rounded; NaN → 0)."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0)
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
