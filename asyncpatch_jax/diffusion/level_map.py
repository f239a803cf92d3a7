"""Level maps: one noise level per token.

Data `x` has shape `[B, *spatial, C]` (1-D, 2-D or 3-D spatial, channels last). A token is a patch
of `p` elements along every spatial axis, so a level map `t` has shape `[B, *spatial/p]` with
values in [0, 1] (0 clean, 1 pure noise). `expand_levels` repeats each token's level over its
patch and the channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PatchSize = int | Sequence[int]


def _patch_tuple(patch_size: PatchSize, num_spatial: int) -> tuple[int, ...]:
  if isinstance(patch_size, int | np.integer):
    patch = (int(patch_size),) * num_spatial
  else:
    patch = tuple(int(p) for p in patch_size)
  if len(patch) != num_spatial:
    raise ValueError(f"patch_size {patch_size} has {len(patch)} entries but the data has "
                     f"{num_spatial} spatial axes")
  if any(p < 1 for p in patch):
    raise ValueError(f"patch_size must be positive, got {patch_size}")
  return patch


def token_grid(x_shape: Sequence[int], patch_size: PatchSize = 1) -> tuple[int, ...]:
  """The level-map shape `[B, *spatial/p]` for data of shape `x_shape = [B, *spatial, C]`."""
  x_shape = tuple(int(d) for d in x_shape)
  if not 3 <= len(x_shape) <= 5:
    raise ValueError(f"x must have shape [B, *spatial, C] with 1 to 3 spatial axes, got "
                     f"shape {x_shape}")
  spatial = x_shape[1:-1]
  patch = _patch_tuple(patch_size, len(spatial))
  for axis, (size, p) in enumerate(zip(spatial, patch)):
    if size % p:
      raise ValueError(f"spatial axis {axis} of x has size {size}, not divisible by the patch "
                       f"size {p}; crop or pad the data, or choose a patch size that divides it")
  return (x_shape[0],) + tuple(s // p for s, p in zip(spatial, patch))


def _is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def check_levels(t: Array, name: str = "t") -> None:
  """Raises if a concrete level map has values outside [0, 1] or non-finite values.

  Under `jit` the values are unknown at trace time and only the shape is checked (by callers).
  """
  if _is_concrete(t):
    values = np.asarray(t)
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1):
      raise ValueError(f"level map `{name}` must lie in [0, 1] (0 clean, 1 noise), found values "
                       f"in [{np.nanmin(values):.4g}, {np.nanmax(values):.4g}]")


def check_level_shape(t: Array, x_shape: Sequence[int], patch_size: PatchSize = 1,
                      name: str = "t") -> None:
  """Raises unless `t` has the token-grid shape of `x_shape` (batch 1 broadcasts)."""
  grid = token_grid(x_shape, patch_size)
  t_shape = tuple(jnp.shape(t))
  if len(t_shape) != len(grid) or t_shape[1:] != grid[1:] or t_shape[0] not in (1, grid[0]):
    raise ValueError(f"level map `{name}` has shape {t_shape} but data of shape "
                     f"{tuple(x_shape)} with patch size {patch_size} needs {grid}")


def expand_levels(t: Array, x_shape: Sequence[int], patch_size: PatchSize = 1) -> Array:
  """Broadcasts a level map `[B, *spatial/p]` to the data shape `[B, *spatial, C]`."""
  check_level_shape(t, x_shape, patch_size)
  check_levels(t)
  x_shape = tuple(x_shape)
  patch = _patch_tuple(patch_size, len(x_shape) - 2)
  t = jnp.asarray(t)
  for axis, p in enumerate(patch, start=1):
    if p > 1:
      t = jnp.repeat(t, p, axis=axis)
  return jnp.broadcast_to(t[..., None], x_shape)


def tokens_mean(values: Array, patch_size: PatchSize = 1) -> Array:
  """Averages data-shaped values `[B, *spatial, C]` over each token → `[B, *spatial/p]`."""
  grid = token_grid(values.shape, patch_size)
  patch = _patch_tuple(patch_size, values.ndim - 2)
  split = [values.shape[0]]
  for g, p in zip(grid[1:], patch):
    split += [g, p]
  v = values.reshape(*split, values.shape[-1])
  patch_axes = tuple(range(2, 2 * len(patch) + 1, 2)) + (v.ndim - 1,)
  return v.mean(axis=patch_axes)


def tokens_sum(values: Array, patch_size: PatchSize = 1) -> Array:
  """Sums data-shaped values `[B, *spatial, C]` over each token → `[B, *spatial/p]`."""
  patch = _patch_tuple(patch_size, values.ndim - 2)
  return tokens_mean(values, patch_size) * (int(np.prod(patch)) * values.shape[-1])
