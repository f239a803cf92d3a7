"""Monotone corruption paths τ: [0, 1] → [0, 1]^N for the ELBO (docs/method.md).

A path is a callable `s -> level map` whose value broadcasts to the token grid `[*grid]` (one
path for every example) or `[B, *grid]` (a path per example). Every coordinate is
non-decreasing in `s`, all 0 at `s = 0` and all 1 at `s = 1`. Each coordinate is then a
time-changed 1-D diffusion, so every such path (and any mixture of paths) gives a valid ELBO.

The ELBO evaluates a path for a whole batch at once, calling it with `s` of shape `[B, 1, ..., 1]`
(one value per example, broadcastable against the grid): build paths from elementwise jnp
operations in `s`, as those below are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Path = Callable[[Array], Array]
NAMES = ("homogeneous", "raster", "random")  # the paths `--mode=eval` reports bits/dim along


def homogeneous() -> Path:
  """τ_i(s) = s: every token shares the level — VDM's continuous-time ELBO."""
  return lambda s: jnp.asarray(s, jnp.float32)


def ordered(positions: Array, overlap: float = 0.0, *, batched: bool = False) -> Path:
  """Tokens generated in the order given by `positions` (0 = generated first).

  In the forward (noising) direction the last-generated token is noised first:
  τ_k(s) = clip(s·T − (K − 1 − pos_k)(1 − ρ), 0, 1) with T = (K − 1)(1 − ρ) + 1, so ρ = 0 is the
  autoregressive factorisation (one token after another) and ρ → 1 the homogeneous path.
  `positions` has the grid's shape, or `[B, *grid]` with `batched=True` for an order per example.
  """
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
  positions = jnp.asarray(positions, jnp.float32)
  num_tokens = positions.size // positions.shape[0] if batched else positions.size
  step = 1.0 - overlap
  total = (num_tokens - 1) * step + 1.0

  def path(s: Array) -> Array:
    return jnp.clip(s * total - (num_tokens - 1 - positions) * step, 0.0, 1.0)

  return path


def raster(grid: Sequence[int], overlap: float = 0.0) -> Path:
  """Raster order over a token grid (row-major): the autoregressive path."""
  grid = tuple(int(g) for g in grid)
  return ordered(jnp.arange(math.prod(grid), dtype=jnp.float32).reshape(grid), overlap)


def random_order(grid: Sequence[int], rng: Array, overlap: float = 0.0,
                 batch: int | None = None) -> Path:
  """A uniformly random token order drawn from `rng`: one for all examples, or one per example
  when `batch` is given (the path then returns `[batch, *grid]`)."""
  grid = tuple(int(g) for g in grid)
  tokens = jnp.arange(math.prod(grid), dtype=jnp.float32)
  if batch is None:
    return ordered(jax.random.permutation(rng, tokens).reshape(grid), overlap)
  keys = jax.random.split(rng, batch)
  positions = jax.vmap(lambda k: jax.random.permutation(k, tokens))(keys)
  return ordered(positions.reshape((batch, *grid)), overlap, batched=True)


def check_path(path: Path, grid: Sequence[int], num_points: int = 129) -> None:
  """Raises a ValueError unless `path` is a valid monotone path on the token grid `[B, *grid]`.

  Evaluates the path on a grid of `s` at trace time; a path whose values depend on traced
  arrays can only be checked for its shape.
  """
  grid = tuple(int(g) for g in grid)
  try:
    out_shape = jax.eval_shape(path, jax.ShapeDtypeStruct((), jnp.float32)).shape
  except Exception as e:
    raise ValueError(f"path must be a callable s -> level map; calling it failed: {e}") from e
  try:
    np.broadcast_shapes(out_shape, grid)
    if np.broadcast_shapes(out_shape, grid) != grid:
      raise ValueError
  except ValueError:
    raise ValueError(f"path returns level maps of shape {out_shape}, which do not broadcast to "
                     f"the token grid {grid}") from None
  try:
    with jax.ensure_compile_time_eval():
      s = jnp.linspace(0.0, 1.0, num_points)
      values = np.asarray(jax.vmap(path)(s)).reshape(num_points, -1)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # the path depends on traced values (e.g. a random order from a traced key)
  if not np.all(np.isfinite(values)) or values.min() < -1e-6 or values.max() > 1 + 1e-6:
    raise ValueError("path levels must lie in [0, 1]")
  if np.abs(values[0]).max() > 1e-6 or np.abs(values[-1] - 1.0).max() > 1e-6:
    raise ValueError("a path must start with every level at 0 (s = 0) and end with every level "
                     "at 1 (s = 1)")
  if np.any(np.diff(values, axis=0) < -1e-6):
    raise ValueError("path is not monotone: some token's level decreases as s grows; an ELBO "
                     "needs every coordinate non-decreasing")
