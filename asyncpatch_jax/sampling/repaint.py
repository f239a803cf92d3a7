"""RePaint (Lugmayr et al., 2022): inpainting by replacement with resampling jumps, the baseline.

The denoiser always sees a homogeneous level map: at each reverse step the unknown tokens take a
reverse update, the known tokens are replaced by a fresh draw of q(z_s | x_known); every
`jump_length` steps the whole sample is pushed back up `jump_length` levels by the forward
process and denoised again, `resample` times in all. The time sequence is RePaint's
`get_schedule_jump` (with its indices shifted by one: our level index n = their t + 1, n/T is
the level), so the NFE matches the paper's: T + (r − 1)·j·|{0, j, 2j, … < T − j}|.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import Prediction, Schedule, expand_levels, token_grid
from asyncpatch_jax.diffusion.level_map import PatchSize
from asyncpatch_jax.sampling import updates as updates_lib

Array = jax.Array


def repaint_times(num_steps: int, jump_length: int = 10, resample: int = 10) -> np.ndarray:
  """RePaint's level indices n (level n/T), from T down to 0 with the jumps back up."""
  if num_steps < 1 or jump_length < 1 or resample < 1:
    raise ValueError(f"RePaint needs num_steps, jump_length and resample >= 1, got "
                     f"{num_steps}, {jump_length}, {resample}")
  jumps = {j: resample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  t, times = num_steps, [num_steps]
  while t >= 1:
    t -= 1
    times.append(t)
    if jumps.get(t - 1, 0) > 0:  # their index t - 1 is our n = t
      jumps[t - 1] -= 1
      for _ in range(jump_length):
        t += 1
        times.append(t)
  return np.asarray(times, np.int64)


def repaint_nfe(num_steps: int, jump_length: int = 10, resample: int = 10) -> int:
  """Denoiser calls of a RePaint run: the number of reverse (downward) transitions."""
  times = repaint_times(num_steps, jump_length, resample)
  return int(np.sum(np.diff(times) < 0))


def sample_repaint(call: Callable[[Array, Array], Prediction], rng: Array,
                   x_shape: Sequence[int], *, schedule: Schedule, num_steps: int,
                   patch_size: PatchSize = 1, known: Array, known_mask: Array,
                   update: str = "ancestral", jump_length: int = 10, resample: int = 10,
                   return_levels: bool = False) -> tuple[Array, dict]:
  """RePaint sampling; returns (samples, info) like `sampler.sample`.

  The denoiser call is skipped (by `lax.cond`) when nothing in the batch is unknown, so a fully
  known input returns `known` with nfe = 0.
  """
  if update not in ("ancestral", "ddim"):
    raise ValueError(f"RePaint takes update 'ancestral' or 'ddim', got {update!r}")
  x_shape = tuple(int(d) for d in x_shape)
  grid = token_grid(x_shape, patch_size)
  times = repaint_times(num_steps, jump_length, resample)
  pairs = jnp.asarray(np.stack([times[:-1], times[1:]], axis=1), jnp.int32)
  mask_full = expand_levels(known_mask.astype(jnp.float32), x_shape, patch_size) > 0
  any_unknown = jnp.any(~known_mask)
  unknown_ex = jnp.any(~known_mask, axis=tuple(range(1, len(grid))))
  init_key, loop_key = jax.random.split(rng)
  z = jax.random.normal(init_key, x_shape, jnp.float32)

  def body(carry, inputs):
    z, nfe, nfe_ex = carry
    index, (n_from, n_to) = inputs
    t = jnp.full(grid, n_from.astype(jnp.float32) / num_steps)
    s = jnp.full(grid, n_to.astype(jnp.float32) / num_steps)
    k_noise, k_known = jax.random.split(jax.random.fold_in(loop_key, index))
    noise = jax.random.normal(k_noise, x_shape, jnp.float32)
    down = n_to < n_from
    run = down & any_unknown
    x0 = jax.lax.cond(run, lambda z_: call(z_, t).x0, lambda z_: jnp.zeros_like(z_), z)
    if update == "ancestral":
      z_down = updates_lib.ancestral_step(z, t, s, x0, noise, schedule=schedule,
                                          patch_size=patch_size)
    else:
      z_down = updates_lib.ddim_step(z, t, s, x0, schedule=schedule, patch_size=patch_size)
    s_full = expand_levels(s, x_shape, patch_size)
    alpha_s, sigma_s = schedule.alpha_sigma(s_full)
    z_known = jnp.where(s_full == 0, known, alpha_s * known + sigma_s * jax.random.normal(
        k_known, x_shape, jnp.float32))
    z_down = jnp.where(mask_full, z_known, z_down)
    # Forward jump q(z_s | z_t), s > t: α_{s|t} = α_s/α_t, σ²_{s|t} = σ_s² − α²_{s|t} σ_t².
    alpha_t, sigma_t = schedule.alpha_sigma(expand_levels(t, x_shape, patch_size))
    ratio = alpha_s / alpha_t
    z_up = ratio * z + jnp.sqrt(jnp.maximum(sigma_s**2 - ratio**2 * sigma_t**2, 0.0)) * noise
    z = jnp.where(down, z_down, z_up)
    calls = run.astype(jnp.int32)
    return (z, nfe + calls, nfe_ex + calls * unknown_ex), s

  init = (z, jnp.zeros((), jnp.int32), jnp.zeros((x_shape[0],), jnp.int32))
  (z, nfe, nfe_ex), levels = jax.lax.scan(body, init, (jnp.arange(len(pairs)), pairs))
  z = jnp.where(mask_full, known, z)
  info = {"nfe": nfe, "nfe_per_example": nfe_ex, "num_steps": jnp.int32(len(pairs))}
  if return_levels:
    start = jnp.ones((1,) + grid, jnp.float32)
    info["levels"] = jnp.concatenate([start, levels], axis=0)
  return z, info
