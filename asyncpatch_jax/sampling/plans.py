"""Plans: the level of every token at every step of the sampler.

A plan starts every unknown token at level 1 and, at each step, says which level each token
moves to next. The sampler (`sampler.run_plan`) enforces the invariants, so a plan only has to
propose levels: next levels are clipped to [0, current] (never re-noised), known tokens stay at
0, and whatever is still noisy at the plan's last step goes to 0 there.

`next_levels` sees the step's prediction through the per-token uncertainty, so a plan can be
static (uniform, raster / spiral autoregressive) or decided on the fly (most-certain-first,
the uncertainty-guided rules in `adaptive.py`). Plans are frozen dataclasses; their state is a
pytree carried in the sampling loop.

Autoregressive plans follow docs/method.md: token group k with slot π(k) has level
t_k(m) = clip(1 − (m − o_π(k))/S, 0, 1) after m steps, with offsets o_j = ⌊j·S·(1 − ρ)⌋,
S steps per group and overlap ρ (0: one group after another; > 0: a pyramid; 1: all at once).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion.level_samplers import group_ids, group_shape_for, spiral_rank

Array = jax.Array
ORDERS = ("raster", "spiral", "certainty")


class Plan(abc.ABC):
  """Per-token levels at each step. Subclasses are frozen dataclasses.

  Attributes (of every subclass):
    max_steps: an upper bound on the number of steps (and of loop iterations).
    needs_variance: whether `next_levels` reads the denoiser's uncertainty.
  """

  max_steps: int
  needs_variance: bool = False

  def init(self, known_mask: Array) -> Any:
    """The plan's loop state for a token-level `known_mask` `[B, *grid]`."""
    del known_mask
    return ()

  @abc.abstractmethod
  def next_levels(self, step: Array, levels: Array, token_variance: Array | None,
                  known_mask: Array, state: Any) -> tuple[Array, Any]:
    """Proposes the levels after step `step` (0-based).

    Args:
      step: int32 scalar, the step about to be taken.
      levels: the current level map `[B, *grid]` (1 for tokens not yet started).
      token_variance: the step's predicted uncertainty averaged over each token,
        `[B, *grid]`, or None when the denoiser has no uncertainty head.
      known_mask: `[B, *grid]` bool, True where the token is known.
      state: the plan's loop state.
    """


def _check_steps(name: str, value: int) -> int:
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class UniformPlan(Plan):
  """All unknown tokens share the level 1 − m/M after m of M steps: standard diffusion."""

  num_steps: int

  def __post_init__(self):
    _check_steps("num_steps", self.num_steps)

  @property
  def max_steps(self) -> int:  # type: ignore[override]
    return self.num_steps

  def next_levels(self, step, levels, token_variance, known_mask, state):
    del token_variance, known_mask
    level = (self.num_steps - 1 - step).astype(jnp.float32) / self.num_steps  # exact 0 at the end
    return jnp.full(levels.shape, level, jnp.float32), state


@dataclasses.dataclass(frozen=True, eq=False)
class StaticPlan(Plan):
  """An explicit plan: `levels[m]` is the level map after m steps, `[M + 1, *grid]`.

  `levels[0]` must be 1 and `levels[M]` 0 on every token, each token non-increasing; a leading
  batch axis (`[M + 1, B, *grid]`) gives each example its own plan.
  """

  levels: np.ndarray

  def __post_init__(self):
    levels = np.asarray(self.levels, np.float32)
    if levels.ndim < 2 or levels.shape[0] < 2:
      raise ValueError(f"a static plan needs levels of shape [M + 1, *grid] with M >= 1, got "
                       f"{levels.shape}")
    if not (np.all(levels[0] == 1) and np.all(levels[-1] == 0)):
      raise ValueError("a static plan must start every token at level 1 and end it at 0")
    if np.any(np.diff(levels, axis=0) > 0):
      raise ValueError("a static plan's levels must be non-increasing along the steps")
    object.__setattr__(self, "levels", levels)

  @property
  def max_steps(self) -> int:  # type: ignore[override]
    return self.levels.shape[0] - 1

  def next_levels(self, step, levels, token_variance, known_mask, state):
    del token_variance, known_mask
    nxt = jax.lax.dynamic_index_in_dim(jnp.asarray(self.levels), step + 1, keepdims=False)
    return jnp.broadcast_to(nxt, levels.shape), state


def autoregressive_offsets(num_groups: int, steps_per_group: int, overlap: float) -> np.ndarray:
  """o_j = ⌊j·S·(1 − ρ)⌋ for j < K (int64)."""
  if not 0.0 <= overlap <= 1.0:
    raise ValueError(f"overlap must lie in [0, 1], got {overlap}")
  j = np.arange(num_groups, dtype=np.float64)
  return np.floor(j * steps_per_group * (1.0 - overlap) + 1e-9).astype(np.int64)


def autoregressive_num_steps(num_groups: int, steps_per_group: int, overlap: float) -> int:
  """The plan length o_{K−1} + S."""
  return int(autoregressive_offsets(num_groups, steps_per_group, overlap)[-1]) + steps_per_group


def autoregressive_overlap(num_groups: int, steps_per_group: int, num_steps: int) -> float:
  """The overlap ρ whose plan of S = `steps_per_group` steps per group takes `num_steps` steps.

  So a total budget N buys every group S ≤ N updates: (K − 1)·S·(1 − ρ) + S = N.
  """
  if steps_per_group > num_steps:
    raise ValueError(f"steps_per_group={steps_per_group} exceeds num_steps={num_steps}")
  if num_groups == 1:
    if steps_per_group != num_steps:
      raise ValueError("one group takes exactly steps_per_group steps: pass num_steps equal "
                       "to it")
    return 0.0
  overlap = 1.0 - (num_steps - steps_per_group) / ((num_groups - 1) * steps_per_group)
  if overlap < 0:
    raise ValueError(f"num_steps={num_steps} is more than {num_groups} groups of "
                     f"{steps_per_group} steps take one after another "
                     f"({num_groups * steps_per_group}): raise steps_per_group")
  # The smallest ρ that fits (offsets are floored): nudge up past round-off, then check.
  for nudge in (0.0, 1e-9, 1e-6):
    rho = min(1.0, overlap + nudge)
    if autoregressive_num_steps(num_groups, steps_per_group, rho) == num_steps:
      return rho
  raise ValueError(f"no overlap gives exactly num_steps={num_steps} for {num_groups} groups of "
                   f"{steps_per_group} steps")


def autoregressive_levels(num_groups: int, steps_per_group: int, overlap: float) -> np.ndarray:
  """The staircase t_k(m) for groups in slot order, `[M + 1, K]` (for plots and the ELBO)."""
  offsets = autoregressive_offsets(num_groups, steps_per_group, overlap)
  m = np.arange(autoregressive_num_steps(num_groups, steps_per_group, overlap) + 1)
  return np.clip(1.0 - (m[:, None] - offsets[None, :]) / steps_per_group, 0.0, 1.0)


def _group_sum(values: Array, membership: np.ndarray) -> Array:
  """Per-example sums of token values `[B, N]` over groups → `[B, K]`.

  A product with the static one-hot membership `[N, K]` rather than a scatter
  (`segment_sum`), so a batch sharded over a mesh (also with explicit axis types) stays
  sharded without collectives; HIGHEST precision keeps integer offsets exact on TPU.
  """
  return jnp.dot(values, jnp.asarray(membership, values.dtype),
                 precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class AutoregressivePlan(Plan):
  """Token groups one after another (with overlap ρ), in raster, spiral or most-certain order.

  Groups made only of known tokens take no slot: the remaining groups move up, so inpainting
  and outpainting spend steps only where something is unknown. With `order='certainty'` the next
  slot goes to the unstarted group whose unknown tokens have the lowest mean predicted variance
  at that step (ties by row-major index); raster and spiral orders are fixed.

  Attributes:
    grid: the token grid `spatial/p` (without the batch axis).
    steps_per_group: S, the steps each group takes from level 1 to 0.
    overlap: ρ ∈ [0, 1].
    order: 'raster', 'spiral' (centre-out) or 'certainty'.
    group_shape: tokens per group along each grid axis (1: every token is a group), or a
      layout name: 'token', 'row', 'column', 'block<b>'. The groups must tile the grid.
  """

  grid: tuple[int, ...]
  steps_per_group: int
  overlap: float = 0.0
  order: str = "raster"
  group_shape: int | tuple[int, ...] | str = 1

  def __post_init__(self):
    _check_steps("steps_per_group", self.steps_per_group)
    if self.order not in ORDERS:
      raise ValueError(f"unknown autoregressive order {self.order!r}; choose one of {ORDERS}")
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
    if isinstance(self.group_shape, str):
      object.__setattr__(self, "group_shape", group_shape_for(self.group_shape, self.grid))
    elif not isinstance(self.group_shape, int):
      object.__setattr__(self, "group_shape", tuple(int(g) for g in self.group_shape))
    autoregressive_offsets(1, 1, self.overlap)  # validates ρ
    group_ids(self.grid, self.group_shape)  # validates the group shape
    shape = ((self.group_shape,) * len(self.grid) if isinstance(self.group_shape, int)
             else self.group_shape)
    if any(g % s for g, s in zip(self.grid, shape)):
      raise ValueError(f"group_shape {self.group_shape} does not tile the token grid "
                       f"{self.grid}: use sizes that divide the grid (or 'row' / 'column')")

  @property
  def needs_variance(self) -> bool:  # type: ignore[override]
    return self.order == "certainty"

  @property
  def num_groups(self) -> int:
    return math.prod(group_ids(self.grid, self.group_shape)[1])

  @property
  def offsets(self) -> np.ndarray:
    return autoregressive_offsets(self.num_groups, self.steps_per_group, self.overlap)

  @property
  def max_steps(self) -> int:  # type: ignore[override]
    return autoregressive_num_steps(self.num_groups, self.steps_per_group, self.overlap)

  def static_rank(self) -> np.ndarray:
    """The rank of each group under a fixed order (row-major index for 'certainty' ties)."""
    group_grid = group_ids(self.grid, self.group_shape)[1]
    if self.order == "spiral":
      return spiral_rank(group_grid)
    return np.arange(math.prod(group_grid))

  def membership(self) -> np.ndarray:
    """The one-hot token → group matrix `[N, K]` (float32)."""
    ids = group_ids(self.grid, self.group_shape)[0].reshape(-1)
    return (ids[:, None] == np.arange(self.num_groups)[None, :]).astype(np.float32)

  def init(self, known_mask):
    batch = known_mask.shape[0]
    unknown = (~known_mask).reshape(batch, -1).astype(jnp.float32)
    return {"offset": jnp.full((batch, self.num_groups), jnp.inf, jnp.float32),
            "num_started": jnp.zeros((batch,), jnp.int32),
            "has_unknown": _group_sum(unknown, self.membership()) > 0}

  def next_levels(self, step, levels, token_variance, known_mask, state):
    membership = self.membership()
    batch, k = levels.shape[0], self.num_groups
    if self.order == "certainty":
      # The mean predicted variance of each group's unknown tokens.
      unknown = (~known_mask).reshape(batch, -1).astype(jnp.float32)
      total = _group_sum(token_variance.reshape(batch, -1) * unknown, membership)
      count = _group_sum(unknown, membership)
      score = jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.inf)
    else:
      score = jnp.broadcast_to(jnp.asarray(self.static_rank(), jnp.float32), (batch, k))
    # Start the groups whose slots open at this step: slots j with o_j <= step.
    offsets = jnp.asarray(self.offsets, jnp.float32)
    num_open = jnp.sum(offsets <= step.astype(jnp.float32)).astype(jnp.int32)
    available = state["has_unknown"] & jnp.isinf(state["offset"])
    masked = jnp.where(available, score, jnp.inf)
    rank = jnp.argsort(jnp.argsort(masked, axis=1, stable=True), axis=1, stable=True)
    rank = rank.astype(jnp.int32)
    start = available & (rank < (num_open - state["num_started"])[:, None])
    # Slots fill as they open (while groups remain), so every slot opening now has o_j = step.
    offset = jnp.where(start, step.astype(jnp.float32), state["offset"])
    state = {**state, "offset": offset,
             "num_started": state["num_started"] + start.sum(axis=1).astype(jnp.int32)}
    # Each token's group offset (unstarted: a sentinel far beyond any step, as inf · 0 = nan).
    started = jnp.isfinite(offset)
    token_offset = _group_sum(jnp.where(started, offset, 1e9), membership.T).reshape(levels.shape)
    token_offset = jnp.where(token_offset >= 1e9, jnp.inf, token_offset)
    # Steps left, S − (m − o), is integer-valued: 0 and S give exactly 0 and 1 (no round-off
    # from XLA's x/S → x·(1/S)).
    remaining = jnp.clip(self.steps_per_group - ((step + 1).astype(jnp.float32) - token_offset),
                         0.0, self.steps_per_group)
    nxt = jnp.where(remaining >= self.steps_per_group, 1.0, remaining / self.steps_per_group)
    return jnp.where(jnp.isinf(token_offset), 1.0, nxt), state
