"""What every network shares: the output type, input validation and the uncertainty head.

A model is called as `model(z, t, labels=None, *, deterministic=True) -> ModelOutput` with
`z: [B, *spatial, C]`, the level map `t: [B, *spatial/p]` (or scalar levels `t: [B]`, the same
level for every token) and integer `labels: [B]` (the null class is `num_classes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asyncpatch_jax.diffusion.parametrization import log_x0_error_scale
from asyncpatch_jax.diffusion.schedules import Schedule

Array = jax.Array
DTYPES = ("float32", "bfloat16")
# Rematerialisation of each block in the backward pass: what its forward keeps for the gradient.
# 'full': only the block's input (the whole block is recomputed); 'dots_saveable': matmul outputs
# (elementwise work is recomputed); 'dots_with_no_batch_dims_saveable': those of the weight
# matmuls only (attention scores are recomputed). '' keeps everything (no recomputation).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
  """A network's raw prediction.

  Attributes:
    output: `[B, *spatial, C]` in the model's parametrisation (ε, x0 or v), float32.
    log_variance: `[B, *spatial, C]`, the per-element log of the predicted squared error of x̂0
      (always in x0 space, whatever the parametrisation), or None without an uncertainty head.
  """

  output: Array
  log_variance: Array | None = None


def resolve_dtype(dtype: str) -> jnp.dtype:
  if str(dtype) not in DTYPES:
    raise ValueError(f"unknown model dtype {dtype!r}; choose one of {DTYPES}")
  return jnp.dtype(str(dtype))


def check_remat(remat: str) -> str:
  if remat and remat not in REMAT_POLICIES:
    raise ValueError(f"unknown model.remat {remat!r}; choose '' (off) or one of "
                     f"{sorted(REMAT_POLICIES)}")
  return str(remat or "")


def rematerialised(fn: Callable, remat: str, *, prevent_cse: bool = True) -> Callable:
  """`fn` (taking a block module first) under `nnx.remat` with the named policy; '' → `fn`.

  `prevent_cse=False` is right inside `scan` (the loop already keeps XLA from merging the
  recomputation into the forward pass) and faster.
  """
  if not check_remat(remat):
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def spatial_grid(data_shape: Sequence[int], patch: int, what: str) -> tuple[int, ...]:
  """`spatial/patch` for `data_shape = (*spatial, C)`, raising if the patch doesn't divide it."""
  data_shape = tuple(int(d) for d in data_shape)
  if not 2 <= len(data_shape) <= 3:
    raise ValueError(f"data_shape must be (L, C) or (H, W, C) (spatial dims then channels, no "
                     f"batch), got {data_shape}")
  if int(patch) < 1:
    raise ValueError(f"{what} must be a positive integer, got {patch}")
  spatial = data_shape[:-1]
  for axis, size in enumerate(spatial):
    if size % patch:
      raise ValueError(f"spatial axis {axis} of data_shape {data_shape} has size {size}, not "
                       f"divisible by the {what} {patch}")
  return tuple(s // patch for s in spatial)


def check_data(z: Array, data_shape: tuple[int, ...], model: str) -> None:
  if z.ndim != len(data_shape) + 1 or tuple(z.shape[1:]) != tuple(data_shape):
    raise ValueError(f"{model} was built for inputs [B, {', '.join(map(str, data_shape))}] but z "
                     f"has shape {tuple(z.shape)}")


def check_level_map(t: Array, batch: int, level_grid: tuple[int, ...], level_patch: int,
                    model: str) -> Array:
  """Returns `t` as float32 `[B]` (scalar levels) or `[B, *level_grid]` (a level map).

  A level map with batch 1 broadcasts over the batch; a 0-d `t` is one level for everything.
  """
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return jnp.broadcast_to(t, (batch,))
  if t.ndim == 1:
    if t.shape[0] not in (1, batch):
      raise ValueError(f"{model}: scalar levels t must have shape [B] = [{batch}], got "
                       f"{tuple(t.shape)}")
    return jnp.broadcast_to(t, (batch,))
  if t.ndim != len(level_grid) + 1 or tuple(t.shape[1:]) != level_grid or \
      t.shape[0] not in (1, batch):
    raise ValueError(f"{model}: level map t has shape {tuple(t.shape)} but with level patch size "
                     f"{level_patch} it must be [B, *spatial/p] = "
                     f"{(batch, *level_grid)} (or [B] for one level per example)")
  return jnp.broadcast_to(t, (batch, *level_grid))


def check_labels(labels: Array | None, batch: int, num_classes: int, model: str) -> Array | None:
  """Returns int32 labels `[B]`; None becomes the null class. Unconditional models ignore them."""
  if num_classes == 0:
    return None
  if labels is None:
    return jnp.full((batch,), num_classes, jnp.int32)
  labels = jnp.asarray(labels)
  if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{model}: labels must be integers of shape [B] = [{batch}], got "
                     f"{labels.dtype}{list(labels.shape)}")
  return labels.astype(jnp.int32)


def repeat_spatial(a: Array, factor: int, num_spatial: int) -> Array:
  """Nearest-neighbour upsampling: repeats entries `factor` times along axes 1..num_spatial."""
  if factor > 1:
    for axis in range(1, num_spatial + 1):
      a = jnp.repeat(a, factor, axis=axis)
  return a


def avg_pool_spatial(a: Array, factor: int) -> Array:
  """Averages non-overlapping `factor`-sized windows along every spatial axis of `[B, *S, D]`."""
  if factor == 1:
    return a
  spatial = a.shape[1:-1]
  split = [a.shape[0]]
  for s in spatial:
    split += [s // factor, factor]
  a = a.reshape(*split, a.shape[-1])
  return a.mean(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def levels_per_element(t: Array, data_shape: tuple[int, ...], level_patch: int) -> Array:
  """Broadcastable per-element levels: `[B, *spatial, 1]` for a map, `[B, 1.., 1]` for `[B]`."""
  if t.ndim == 1:
    return t.reshape((t.shape[0],) + (1,) * len(data_shape))
  return repeat_spatial(t, level_patch, t.ndim - 1)[..., None]


def split_head(out: Array, t: Array, *, channels: int, uncertainty: bool, schedule: Schedule,
               parametrization: str, data_shape: tuple[int, ...], level_patch: int
               ) -> ModelOutput:
  """Splits `[B, *spatial, C or 2C]` into the prediction and the x0-space log-variance.

  The head's raw channels r are the log squared error *in the parametrisation's own units*; the
  x0-space log-variance is r + log c²(λ) with ‖x̂0 − x0‖² = c² ‖output − target‖² (σ²/α² for ε,
  σ² for v, 1 for x0). With the zero-initialised head (r = 0) this is exactly the expected x0
  error of the zero prediction on unit-variance data in all three parametrisations, so the
  uncertainty starts calibrated.
  """
  out = out.astype(jnp.float32)
  if not uncertainty:
    return ModelOutput(out, None)
  output, raw = out[..., :channels], out[..., channels:]
  lam = schedule.log_snr(levels_per_element(t, data_shape, level_patch))
  return ModelOutput(output, raw + log_x0_error_scale(lam, parametrization))


def num_params(state) -> int:
  """Total size of the arrays (or ShapeDtypeStructs) in a state pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
