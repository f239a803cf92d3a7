"""Outpainting: canvases larger than the training size, by sliding windows.

The canvas is covered by windows of the model's size, visited in raster order with a given
stride. Each window is one inpainting run of `sample`: whatever earlier windows (or the caller)
already fixed is known context at level 0, the rest is generated, with any strategy (an
autoregressive plan inside each window, say). The windows run in one `lax.scan`, so the whole
canvas is still a single compiled program.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import expand_levels, token_grid
from asyncpatch_jax.diffusion.level_map import PatchSize, _patch_tuple
from asyncpatch_jax.sampling import sampler as sampler_lib

Array = jax.Array


def window_starts(canvas: Sequence[int], window: Sequence[int],
                  stride: Sequence[int]) -> np.ndarray:
  """Raster-ordered start corners `[P, d]` of windows covering `canvas` (the last one flush)."""
  per_axis = []
  for c, w, s in zip(canvas, window, stride):
    starts = list(range(0, c - w + 1, s))
    if starts[-1] != c - w:
      starts.append(c - w)
    per_axis.append(starts)
  return np.asarray(list(itertools.product(*per_axis)), np.int32).reshape(-1, len(canvas))


def outpaint(denoiser: sampler_lib.Denoiser, rng: Array, canvas_shape: Sequence[int], *,
             window: Sequence[int], stride: Sequence[int] | int | None = None,
             patch_size: PatchSize = 1, known: Array | None = None,
             known_mask: Array | None = None, **sample_kwargs) -> tuple[Array, dict]:
  """Samples a canvas `[B, *canvas_spatial, C]` with a denoiser of spatial size `window`.

  Args:
    denoiser: the core protocol, for inputs `[B, *window, C]`.
    canvas_shape: `[B, *spatial, C]`, each spatial size ≥ the window's.
    window: the model's spatial size.
    stride: window step per axis (default: half the window); a multiple of the patch size.
    known, known_mask: clean values and token-level mask on the canvas, as for `sample`.
    **sample_kwargs: passed to `sample` for every window (schedule, strategy, num_steps, ...).

  Returns:
    (canvas, info): info 'nfe' (total calls), 'nfe_per_window' `[P]`, 'window_starts' `[P, d]`
    (element coordinates), and any per-window info `sample` returns, stacked over windows.
  """
  canvas_shape = tuple(int(d) for d in canvas_shape)
  token_grid(canvas_shape, patch_size)
  spatial = canvas_shape[1:-1]
  window = tuple(int(w) for w in window)
  if len(window) != len(spatial):
    raise ValueError(f"window {window} must have one size per spatial axis of canvas_shape "
                     f"{canvas_shape}")
  patch = _patch_tuple(patch_size, len(spatial))
  if stride is None:
    stride = tuple(max(p, (w // 2) // p * p) for w, p in zip(window, patch))
  stride = _patch_tuple(stride, len(spatial))
  for name, sizes in (("window", window), ("stride", stride)):
    if any(v % p for v, p in zip(sizes, patch)):
      raise ValueError(f"{name} {sizes} must be a multiple of the patch size {patch}")
  if any(w > c for w, c in zip(window, spatial)):
    raise ValueError(f"window {window} is larger than the canvas {spatial}")
  window_shape = (canvas_shape[0], *window, canvas_shape[-1])
  token_grid(window_shape, patch_size)
  known_arr, mask = sampler_lib.prepare_known(canvas_shape, known, known_mask, patch_size)
  starts = window_starts(spatial, window, stride)
  window_grid = tuple(w // p for w, p in zip(window, patch))
  sample_fn = functools.partial(sampler_lib.sample, denoiser, x_shape=window_shape,
                                patch_size=patch_size, **sample_kwargs)

  def body(carry, inputs):
    canvas, canvas_mask = carry
    index, start = inputs
    corner = (0, *[start[i] for i in range(len(spatial))], 0)
    token_corner = (0, *[start[i] // patch[i] for i in range(len(spatial))])
    win = jax.lax.dynamic_slice(canvas, corner, window_shape)
    win_mask = jax.lax.dynamic_slice(canvas_mask, token_corner, (canvas_shape[0], *window_grid))
    out, info = sample_fn(jax.random.fold_in(rng, index), known=win, known_mask=win_mask)
    canvas = jax.lax.dynamic_update_slice(canvas, out, corner)
    canvas_mask = jax.lax.dynamic_update_slice(canvas_mask, jnp.ones_like(win_mask), token_corner)
    return (canvas, canvas_mask), info

  mask_full = expand_levels(mask.astype(jnp.float32), canvas_shape, patch_size) > 0
  init = (jnp.where(mask_full, known_arr, 0.0), mask)
  (canvas, _), infos = jax.lax.scan(body, init, (jnp.arange(len(starts)),
                                                 jnp.asarray(starts)))
  info = {"nfe": jnp.sum(infos["nfe"]), "nfe_per_window": infos["nfe"],
          "window_starts": jnp.asarray(starts)}
  info.update({k: v for k, v in infos.items() if k != "nfe"})
  return canvas, info
