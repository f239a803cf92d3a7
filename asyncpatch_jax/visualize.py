"""Pictures: image grids (PNG) and how the level map evolved (GIF or a PNG strip).

Images are `[N, H, W, C]` in [−1, 1] (C = 1 or 3); level maps are `[steps, B, *grid]` in [0, 1]
with 0 (clean) drawn dark and 1 (noise) bright, each token a square block. Files are written
through `file_io`, so a crash or a reader never sees half a picture.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from asyncpatch_jax import file_io, pixels

_BORDER = 2


def make_grid(images: np.ndarray, nrow: int | None = None, border: int = _BORDER,
              fill: int = 255) -> np.ndarray:
  """Tiles uint8 images `[N, H, W, C]` into one `[rows·(H+b)+b, nrow·(W+b)+b, C]` array.

  `nrow` is the number of images per row (default ⌈√N⌉), as in torchvision.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("no images to tile")
  nrow = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
  rows = math.ceil(n / nrow)
  grid = np.full((rows * (h + border) + border, nrow * (w + border) + border, c), fill,
                 images.dtype)
  for i in range(n):
    r, col = divmod(i, nrow)
    y, x = border + r * (h + border), border + col * (w + border)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def _as_image(array: np.ndarray) -> Image.Image:
  if array.shape[-1] == 1:
    return Image.fromarray(array[..., 0], mode="L")
  if array.shape[-1] == 3:
    return Image.fromarray(array, mode="RGB")
  raise ValueError(f"images need 1 or 3 channels, got {array.shape[-1]}")


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None) -> None:
  """Saves `[N, H, W, C]` images in [−1, 1] (C = 1 or 3) as one PNG grid, `nrow` per row."""
  images = np.asarray(images)
  if images.ndim == 3:  # [N, H, W]
    images = images[..., None]
  grid = make_grid(pixels.to_uint8(images), nrow)
  with file_io.atomic_open(path, "wb") as f:
    _as_image(grid).save(f, format="PNG")


def masked_images(images: np.ndarray, known_mask: np.ndarray, fill: float = 0.0) -> np.ndarray:
  """The inpainting input as a picture: unknown tokens replaced by `fill` (grey at 0).

  `known_mask` `[N, *grid]` is expanded to the image by repeating each token.
  """
  images, known_mask = np.asarray(images, np.float32), np.asarray(known_mask, bool)
  for axis in range(1, known_mask.ndim):
    reps = images.shape[axis] // known_mask.shape[axis]
    known_mask = np.repeat(known_mask, reps, axis=axis)
  return np.where(known_mask[..., None], images, fill)


def level_map_frames(level_maps: np.ndarray, scale: int | None = None,
                     nrow: int | None = None) -> np.ndarray:
  """Level maps `[steps, B, *grid]` (1-D or 2-D grids) → uint8 RGB frames `[steps, H, W, 3]`.

  Each frame tiles the batch; each token becomes a `scale`² block (default: ≥ 64 px a map).
  Colours follow matplotlib's 'magma' (dark = clean, bright = noise).
  """
  from matplotlib import colormaps  # imported here: matplotlib is slow to import

  maps = np.asarray(level_maps, np.float32)
  if maps.ndim == 3:  # 1-D grids: [steps, B, N] → one row per map
    maps = maps[:, :, None, :]
  if maps.ndim != 4:
    raise ValueError(f"level maps must be [steps, B, *grid] with a 1-D or 2-D grid, got shape "
                     f"{np.shape(level_maps)}")
  steps, _, gh, gw = maps.shape
  scale = scale or max(1, math.ceil(64 / max(gh, gw)))
  maps = np.repeat(np.repeat(np.clip(maps, 0.0, 1.0), scale, axis=2), scale, axis=3)
  rgb = (colormaps["magma"](maps)[..., :3] * 255).round().astype(np.uint8)
  return np.stack([make_grid(rgb[i], nrow) for i in range(steps)])


def save_level_map_gif(level_maps: np.ndarray, path: str | os.PathLike, *,
                       duration_ms: int = 80, max_frames: int = 200,
                       scale: int | None = None) -> None:
  """Saves the level-map evolution `[steps, B, *grid]` as an animated GIF (looping).

  Long trajectories are subsampled to at most `max_frames` frames (first and last kept).
  """
  maps = np.asarray(level_maps)
  if maps.shape[0] == 0:
    raise ValueError("no level maps to draw")
  index = np.unique(np.round(np.linspace(0, maps.shape[0] - 1, min(max_frames,
                                                                   maps.shape[0]))).astype(int))
  frames = [Image.fromarray(f, mode="RGB") for f in level_map_frames(maps[index], scale)]
  with file_io.atomic_open(path, "wb") as f:
    frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                   duration=duration_ms, loop=0)


def save_level_map_strip(level_maps: np.ndarray, path: str | os.PathLike,
                         num_frames: int = 8, example: int = 0,
                         scale: int | None = None) -> None:
  """Saves `num_frames` evenly spaced level maps of one example side by side (a PNG figure)."""
  maps = np.asarray(level_maps)
  index = np.round(np.linspace(0, maps.shape[0] - 1, min(num_frames, maps.shape[0]))).astype(int)
  frames = level_map_frames(maps[index, example:example + 1], scale)
  strip = make_grid(frames, nrow=len(index))
  with file_io.atomic_open(path, "wb") as f:
    _as_image(strip).save(f, format="PNG")


def trim_levels(level_maps: np.ndarray, num_steps: int) -> np.ndarray:
  """The recorded part `[: num_steps + 1]` of a sampler's `info['levels']`."""
  return np.asarray(level_maps)[: int(num_steps) + 1]


__all__ = [
    "level_map_frames",
    "make_grid",
    "masked_images",
    "save_image_grid",
    "save_level_map_gif",
    "save_level_map_strip",
    "trim_levels",
]
