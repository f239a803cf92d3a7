"""Token-level inpainting masks: `[B, *grid]` bool, True = known, built on the host (numpy).

The families of the inpainting literature, on a token grid (`spatial/p`; for p = 1 the pixel
grid): `box` (a missing centre box, or a random one), `half`, `expand` (only a centre crop
known: outpainting), `alternating_lines`, `super_resolution` (every `factor`-th token known),
`random_tokens`, and LaMa's free-form strokes — `strokes(width='narrow')` (LaMa "thin", RePaint
"Narrow") and `strokes(width='wide')` (LaMa "thick" with boxes, RePaint "Wide"); stroke sizes
are LaMa's for 256 × 256, scaled to the grid. Random masks are deterministic given `seed` (an
int, a `numpy.random.Generator` or a JAX key). Masks load from and save to PNG (white = known,
RePaint's `gt_keep_mask` convention; LaMa's white-is-hole files load with `invert=True`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from asyncpatch_jax.diffusion.level_map import PatchSize, _patch_tuple

Seed = int | np.random.Generator | jax.Array | None

# LaMa's generator settings for 256 × 256 (saicinpainting/training/data/masks.py configs).
_STROKES = {
    "narrow": {"irregular": dict(min_times=4, max_times=50, max_width=10, max_angle=4,
                                 max_len=40), "boxes": None},
    "wide": {"irregular": dict(min_times=1, max_times=5, max_width=100, max_angle=4,
                               max_len=200),
             "boxes": dict(min_times=1, max_times=4, margin=10, min_size=30, max_size=150)},
}


def as_generator(seed: Seed) -> np.random.Generator:
  """A numpy Generator from an int, a Generator, a JAX key (typed or raw) or None (seed 0)."""
  if isinstance(seed, np.random.Generator):
    return seed
  if seed is None:
    return np.random.default_rng(0)
  if isinstance(seed, jax.Array):
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
      seed = jax.random.key_data(seed)
    return np.random.default_rng(np.asarray(seed, np.uint32).ravel().tolist())
  return np.random.default_rng(int(seed))


def _grid(grid: Sequence[int]) -> tuple[int, ...]:
  grid = tuple(int(g) for g in grid)
  if not 1 <= len(grid) <= 3 or any(g < 1 for g in grid):
    raise ValueError(f"grid must be 1 to 3 positive sizes (the token grid, no batch), got {grid}")
  return grid


def _grid2(grid: Sequence[int], name: str) -> tuple[int, int]:
  grid = _grid(grid)
  if len(grid) != 2:
    raise ValueError(f"{name} masks are 2-D; got grid {grid}")
  return grid


def _batch(batch: int, mask: np.ndarray) -> np.ndarray:
  return np.broadcast_to(mask, (int(batch),) + mask.shape).copy()


def _central(grid: tuple[int, ...], frac: float) -> tuple[slice, ...]:
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f"the box size must be a fraction in [0, 1], got {frac}")
  out = []
  for g in grid:
    size = round(g * frac)
    lo = (g - size) // 2
    out.append(slice(lo, lo + size))
  return tuple(out)


def box(batch: int, grid: Sequence[int], seed: Seed = None, *, size: float = 0.5,
        random_position: bool = False) -> np.ndarray:
  """A missing box of `size` × each side: centred, or at a random position per example."""
  grid = _grid(grid)
  if not random_position:
    mask = np.ones(grid, bool)
    mask[_central(grid, size)] = False
    return _batch(batch, mask)
  rng = as_generator(seed)
  out = np.ones((int(batch),) + grid, bool)
  for b in range(int(batch)):
    sizes = [round(g * size) for g in grid]
    starts = [int(rng.integers(0, g - s + 1)) for g, s in zip(grid, sizes)]
    out[(b,) + tuple(slice(lo, lo + s) for lo, s in zip(starts, sizes))] = False
  return out


def half(batch: int, grid: Sequence[int], *, side: str = "right") -> np.ndarray:
  """One half missing: `side` in 'left', 'right' (last axis), 'top', 'bottom' (the one before)."""
  grid = _grid(grid)
  sides = {"left": (-1, 0), "right": (-1, 1), "top": (-2, 0), "bottom": (-2, 1)}
  if side not in sides or (len(grid) == 1 and side in ("top", "bottom")):
    raise ValueError(f"unknown side {side!r} for a grid of {len(grid)} axes")
  axis, which = sides[side]
  mask = np.ones(grid, bool)
  n = grid[axis]
  index = [slice(None)] * len(grid)
  index[axis] = slice(n // 2, n) if which else slice(0, n - n // 2)
  mask[tuple(index)] = False
  return _batch(batch, mask)


def expand(batch: int, grid: Sequence[int], *, keep: float = 0.5) -> np.ndarray:
  """Only a centred crop of `keep` × each side is known (RePaint's "Expand")."""
  grid = _grid(grid)
  mask = np.zeros(grid, bool)
  mask[_central(grid, keep)] = True
  return _batch(batch, mask)


def alternating_lines(batch: int, grid: Sequence[int], *, axis: int = 0, period: int = 2,
                      offset: int = 0) -> np.ndarray:
  """Lines along `axis` known where index % period == offset (RePaint's "Alternating Lines")."""
  grid = _grid(grid)
  if period < 1 or not 0 <= offset < period:
    raise ValueError(f"need period >= 1 and 0 <= offset < period, got {period}, {offset}")
  index = np.arange(grid[axis]) % period == offset
  shape = [1] * len(grid)
  shape[axis] = grid[axis]
  return _batch(batch, np.broadcast_to(index.reshape(shape), grid))


def super_resolution(batch: int, grid: Sequence[int], *, factor: int = 2) -> np.ndarray:
  """Every `factor`-th token along every axis known (with p = 1: ×factor super-resolution)."""
  grid = _grid(grid)
  if factor < 1:
    raise ValueError(f"factor must be >= 1, got {factor}")
  idx = np.meshgrid(*[np.arange(g) % factor == 0 for g in grid], indexing="ij")
  return _batch(batch, np.logical_and.reduce(idx))


def random_tokens(batch: int, grid: Sequence[int], seed: Seed = None, *,
                  known_fraction: float = 0.5) -> np.ndarray:
  """Each token known independently with probability `known_fraction`."""
  grid = _grid(grid)
  if not 0.0 <= known_fraction <= 1.0:
    raise ValueError(f"known_fraction must lie in [0, 1], got {known_fraction}")
  return as_generator(seed).random((int(batch),) + grid) < known_fraction


def _irregular(rng: np.random.Generator, draw: ImageDraw.ImageDraw, shape: tuple[int, int],
               scale: float, *, min_times: int, max_times: int, max_width: int, max_angle: int,
               max_len: int) -> None:
  height, width = shape
  for i in range(int(rng.integers(min_times, max_times + 1))):
    x, y = int(rng.integers(width)), int(rng.integers(height))
    for _ in range(1 + int(rng.integers(5))):
      angle = 0.01 + int(rng.integers(max_angle))
      if i % 2 == 0:
        angle = 2 * math.pi - angle
      length = (10 + int(rng.integers(max_len))) * scale
      brush = max(1, round((5 + int(rng.integers(max_width))) * scale))
      x2 = int(np.clip(x + length * math.sin(angle), 0, width - 1))
      y2 = int(np.clip(y + length * math.cos(angle), 0, height - 1))
      draw.line([(x, y), (x2, y2)], fill=255, width=brush)
      for cx, cy in ((x, y), (x2, y2)):  # round joints
        r = brush / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
      x, y = x2, y2


def _boxes(rng: np.random.Generator, draw: ImageDraw.ImageDraw, shape: tuple[int, int],
           scale: float, *, min_times: int, max_times: int, margin: int, min_size: int,
           max_size: int) -> None:
  margin = round(margin * scale)
  lo, hi = max(1, round(min_size * scale)), max(1, round(max_size * scale))
  for _ in range(int(rng.integers(min_times, max_times + 1))):
    corner = []
    for size in shape:
      m = margin if size - 2 * margin >= 1 else 0
      room = size - 2 * m
      extent = int(rng.integers(min(lo, room), min(hi, room) + 1))
      corner.append((int(rng.integers(m, m + room - extent + 1)), extent))
    (y, bh), (x, bw) = corner
    draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=255)


def strokes(batch: int, grid: Sequence[int], seed: Seed = None, *,
            width: str = "narrow") -> np.ndarray:
  """LaMa-style free-form masks: 'narrow' (thin strokes) or 'wide' (thick strokes and boxes)."""
  shape = _grid2(grid, "stroke")
  if width not in _STROKES:
    raise ValueError(f"unknown stroke width {width!r}; choose one of {sorted(_STROKES)}")
  rng = as_generator(seed)
  scale = min(shape) / 256.0
  out = np.empty((int(batch),) + shape, bool)
  for b in range(int(batch)):
    image = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(image)
    _irregular(rng, draw, shape, scale, **_STROKES[width]["irregular"])
    if _STROKES[width]["boxes"] is not None:
      _boxes(rng, draw, shape, scale, **_STROKES[width]["boxes"])
    out[b] = np.asarray(image) < 128  # painted = hole
  return out


MASKS: dict[str, Callable[..., np.ndarray]] = {
    "box": box,
    "half": half,
    "expand": expand,
    "alternating_lines": alternating_lines,
    "super_resolution": super_resolution,
    "random_tokens": random_tokens,
    "narrow": lambda batch, grid, seed=None, **kw: strokes(batch, grid, seed, width="narrow", **kw),
    "wide": lambda batch, grid, seed=None, **kw: strokes(batch, grid, seed, width="wide", **kw),
}
_SEEDED = ("box", "random_tokens", "narrow", "wide")


def make_mask(name: str, batch: int, grid: Sequence[int], seed: Seed = None,
              **kwargs) -> np.ndarray:
  """The named mask family (a key of `MASKS`), `[B, *grid]` bool, True = known."""
  if name not in MASKS:
    raise ValueError(f"unknown mask {name!r}; choose one of {sorted(MASKS)}")
  if name in _SEEDED:
    return MASKS[name](batch, grid, seed, **kwargs)
  return MASKS[name](batch, grid, **kwargs)


def to_token_mask(pixel_mask: np.ndarray, patch_size: PatchSize) -> np.ndarray:
  """A pixel-level known mask `[B, *spatial]` → token level: a token is known iff all its
  pixels are (so no unknown pixel is ever held fixed)."""
  pixel_mask = np.asarray(pixel_mask, bool)
  patch = _patch_tuple(patch_size, pixel_mask.ndim - 1)
  split = [pixel_mask.shape[0]]
  for size, p in zip(pixel_mask.shape[1:], patch):
    if size % p:
      raise ValueError(f"pixel mask of shape {pixel_mask.shape} is not divisible by the patch "
                       f"size {patch}")
    split += [size // p, p]
  axes = tuple(range(2, 2 * len(patch) + 1, 2))
  return pixel_mask.reshape(split).all(axis=axes)


def from_png(path: str | os.PathLike, grid: Sequence[int] | None = None, *,
             patch_size: PatchSize = 1, batch: int = 1, invert: bool = False) -> np.ndarray:
  """Loads a mask image (white = known; `invert` for white = hole) → `[batch, *grid]`.

  The image is read as grayscale and thresholded at half range. `grid` (H/p, W/p) is the
  expected token grid: the image must be either the token grid or the pixel grid (H, W), which
  is reduced with `to_token_mask` (a token is known iff all its pixels are).
  """
  with epath.Path(path).open("rb") as f, Image.open(f) as image:  # local or a bucket URL
    pixels = np.asarray(image.convert("L")) >= 128
  if invert:
    pixels = ~pixels
  if grid is None:
    return _batch(batch, pixels)
  grid = _grid2(grid, "PNG")
  patch = _patch_tuple(patch_size, 2)
  if pixels.shape == grid:
    return _batch(batch, pixels)
  if pixels.shape == tuple(g * p for g, p in zip(grid, patch)):
    return _batch(batch, to_token_mask(pixels[None], patch)[0])
  raise ValueError(f"mask image {os.fspath(path)!r} is {pixels.shape[0]}×{pixels.shape[1]}, but "
                   f"the model needs the token grid {grid} or the pixel grid "
                   f"{tuple(g * p for g, p in zip(grid, patch))}")


def save_png(mask: np.ndarray, path: str | os.PathLike) -> None:
  """Saves one 2-D mask `[H, W]` (or the first of a batch) as a PNG, white = known."""
  mask = np.asarray(mask, bool)
  if mask.ndim == 3:
    mask = mask[0]
  if mask.ndim != 2:
    raise ValueError(f"save_png takes a 2-D mask (or a batch of them), got shape {mask.shape}")
  Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)
