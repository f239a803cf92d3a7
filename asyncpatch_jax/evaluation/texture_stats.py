"""Texture statistics of an inpainted region against its known context (claim 4, input guidance).

For a stationary texture a good completion has the context's statistics, whatever its pixels. Two
measures, per image, on grey images in [-1, 1] with a pixel-level known mask (True = known):

* `gram_distance`: Gatys-style second-order statistics of a small fixed filter bank (the pixel,
  its horizontal and vertical differences and a Laplacian): the Gram matrix of the responses
  over the hole against the one over the context, ‖G_hole − G_ctx‖_F / ‖G_ctx‖_F.
* `local_stats_distance`: the mean and standard deviation of non-overlapping w×w windows,
  averaged over the windows wholly inside the hole against those wholly inside the context:
  |E mean_hole − E mean_ctx| + |E std_hole − E std_ctx|.

The ground truth's own values (original image, same mask) are the reference: natural variation
within a texture is not zero, so a completion near them matches its context as well as the truth
does (one below them is more uniform than the texture, not better).
"""

from __future__ import annotations

import numpy as np

_FILTERS = np.asarray([
    [[0, 0, 0], [0, 1, 0], [0, 0, 0]],        # the pixel
    [[0, 0, 0], [0, -1, 1], [0, 0, 0]],       # horizontal difference
    [[0, 0, 0], [0, -1, 0], [0, 1, 0]],       # vertical difference
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]],       # Laplacian
], np.float64)


def _check(images: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  images = np.asarray(images, np.float64)
  known = np.asarray(known, bool)
  if images.ndim == 4:
    images = images.mean(axis=-1)  # [B, H, W, C] → grey
  if images.ndim != 3 or known.shape != images.shape:
    raise ValueError(f"need images [B, H, W(, C)] and a pixel-level known mask [B, H, W]; got "
                     f"{images.shape} and {known.shape} (expand a token mask with np.repeat)")
  return images, known


def _responses(images: np.ndarray) -> np.ndarray:
  """[B, H−2, W−2, F] filter responses (valid positions only)."""
  b, h, w = images.shape
  out = np.zeros((b, h - 2, w - 2, len(_FILTERS)))
  for f, kernel in enumerate(_FILTERS):
    for dy in range(3):
      for dx in range(3):
        if kernel[dy, dx]:
          out[..., f] += kernel[dy, dx] * images[:, dy:dy + h - 2, dx:dx + w - 2]
  return out


def gram_distance(images: np.ndarray, known: np.ndarray) -> np.ndarray:
  """[B] relative Frobenius distance of the hole's filter Gram matrix to the context's.

  A response belongs to the region of its centre pixel (responses at the hole's rim see some
  context: small holes cannot hold a whole 3×3 support); NaN where a region is empty.
  """
  images, known = _check(images, known)
  resp = _responses(images)
  centre = known[:, 1:-1, 1:-1]
  in_ctx, in_hole = centre, ~centre
  out = np.full(images.shape[0], np.nan)
  for i in range(images.shape[0]):
    a, b = resp[i][in_hole[i]], resp[i][in_ctx[i]]
    if len(a) and len(b):
      ga, gb = a.T @ a / len(a), b.T @ b / len(b)
      out[i] = np.linalg.norm(ga - gb) / max(np.linalg.norm(gb), 1e-12)
  return out


def local_stats_distance(images: np.ndarray, known: np.ndarray, window: int = 4) -> np.ndarray:
  """[B] |E mean_hole − E mean_ctx| + |E std_hole − E std_ctx| over w×w windows (NaN where a
  region has no whole window)."""
  images, known = _check(images, known)
  if window < 2:
    raise ValueError(f"window must be >= 2 pixels (a standard deviation needs two), got {window}")
  b, h, w = images.shape
  hh, ww = h // window, w // window
  if hh == 0 or ww == 0:
    raise ValueError(f"window {window} is larger than the images ({h}×{w})")
  blocks = images[:, :hh * window, :ww * window].reshape(b, hh, window, ww, window)
  kblocks = known[:, :hh * window, :ww * window].reshape(b, hh, window, ww, window)
  mean, std = blocks.mean(axis=(2, 4)), blocks.std(axis=(2, 4))
  in_ctx, in_hole = kblocks.all(axis=(2, 4)), (~kblocks).all(axis=(2, 4))
  out = np.full(b, np.nan)
  for i in range(b):
    if in_hole[i].any() and in_ctx[i].any():
      out[i] = (abs(mean[i][in_hole[i]].mean() - mean[i][in_ctx[i]].mean())
                + abs(std[i][in_hole[i]].mean() - std[i][in_ctx[i]].mean()))
  return out
