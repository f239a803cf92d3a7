"""Distinct-level slots: per-token conditioning at the cost of a few rows per example.

Per-token adaLN computes `m_i = W · SiLU(c(t_i, y)) + b` for every token i: a `d × 6d` matmul
per token and block, about half a DiT block's FLOPs (the spatial FiLM of the U-Net costs the same
share of a residual block). But `m_i` depends on token i only through its level `t_i` (the class
is per example), and sampling plans give each example a handful of distinct levels: one under
uniform sampling, two under inpainting (0 and the current level), a few along an autoregressive
staircase. So per example we find the (at most K) distinct levels, compute the conditioning once
per distinct level ("slot"), and gather it back to the tokens. That is the *same function*
(identical inputs to the same layers), at `K / N` of the dense modulation cost.

`find_level_slots` is static-shaped (sort + cumsum + scatter; jit-, vmap- and sharding-friendly):
it always returns K slots and reports how many distinct levels each example has, so a model can
take the dense path when any example has more (`choose_path`: one `lax.switch` on a scalar for
the whole batch). When every example is homogeneous (uniform sampling, all of an FID run) the
switch takes the scalar-level network itself: gathering per-token modulation is cheap in FLOPs
but materialises `[B, N, 6d]` per block, which costs memory traffic that a broadcast doesn't.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class LevelSlots(NamedTuple):
  """The distinct levels of each example and every token's slot.

  Attributes:
    values: `[B, K]` the distinct levels in increasing order; unused slots repeat the smallest
      level (any valid level: their conditioning is computed but never read).
    index: `[B, N]` int32, the slot of each token (clipped to K − 1 when an example overflows).
    num_distinct: `[B]` int32, the number of distinct levels in each example.
  """

  values: Array
  index: Array
  num_distinct: Array

  @property
  def fits(self) -> Array:
    """Scalar bool: every example has at most K distinct levels (the slots are exact)."""
    return jnp.all(self.num_distinct <= self.values.shape[-1])


def _slots_one(levels: Array, num_slots: int) -> tuple[Array, Array, Array]:
  order = jnp.argsort(levels)
  ordered = levels[order]
  is_new = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
  slot_of_ordered = jnp.cumsum(is_new, dtype=jnp.int32) - 1
  values = jnp.full((num_slots,), ordered[0], levels.dtype)
  values = values.at[slot_of_ordered].set(ordered, mode="drop")
  index = jnp.zeros(levels.shape, jnp.int32).at[order].set(slot_of_ordered)
  return values, jnp.minimum(index, num_slots - 1), slot_of_ordered[-1] + 1


def find_level_slots(levels: Array, num_slots: int) -> LevelSlots:
  """The distinct values of each row of `levels: [B, N]`, as at most `num_slots` slots."""
  if levels.ndim != 2:
    raise ValueError(f"find_level_slots expects levels of shape [B, N], got {levels.shape}")
  if num_slots < 1:
    raise ValueError(f"num_slots must be positive, got {num_slots}")
  values, index, count = jax.vmap(lambda row: _slots_one(row, num_slots))(levels)
  return LevelSlots(values, index, count)


def choose_path(slots: LevelSlots, homogeneous: Callable[[], Array],
                sparse: Callable[[], Array] | None, dense: Callable[[], Array]) -> Array:
  """Runs one of three paths computing the same function, the cheapest that is exact:

  `homogeneous` when every example has a single level (the scalar-level network: its
  conditioning broadcasts and fuses, nothing per token is materialised), else `sparse` (the slot
  path; None to skip it) when every example fits in K slots, else `dense`. Under `jit` this is
  one `lax.switch` on a scalar for the whole batch; eagerly (concrete slots) it just calls the
  chosen path, so op-by-op use doesn't retrace and compile every branch on each call.
  """
  single = jnp.all(slots.num_distinct == 1)
  if sparse is None:
    branch, paths = jnp.where(single, 0, 1), (homogeneous, dense)
  else:
    branch, paths = jnp.where(single, 0, jnp.where(slots.fits, 1, 2)), (homogeneous, sparse, dense)
  if not isinstance(branch, jax.core.Tracer):
    return paths[int(branch)]()
  return jax.lax.switch(branch, paths)


def gather_slots(rows: Array, index: Array) -> Array:
  """`rows: [B, K, D]` per slot → `[B, N, D]` per token, with `index: [B, N]`."""
  return jnp.take_along_axis(rows, index[..., None], axis=1)
