"""Training noise-level samplers: which level maps the network sees during training.

Each sampler is a small frozen dataclass called as `sampler(rng, shape) -> t` with
`shape = (B, *grid)` and `t` in [0, 1]. They are selected from a config (`from_config`).

Independent `t_i ~ U(0, 1)` (`IID`) almost never gives the homogeneous maps that sampling starts
from, so the **controlled sampler** sets the average level and its spatial spread separately:
`t̄ ~ p(t̄)`; with probability `p_hom` every `t_i = t̄` exactly; otherwise
`δ = κ·u·min(t̄ − t_min, t_max − t̄)`, `u ~ U(0, 1)`, and `t_i ~ U(t̄ − δ, t̄ + δ)` (optionally
re-centred so the mean is exactly `t̄`). Structured components match sampling-time use: `Masked`
(known tokens clean or re-noised, the rest at `t̄`, as in inpainting and input guidance),
`Staircase` (the autoregressive plan with token groups at a random moment) and `SmoothField`
(the spatially structured maps of uncertainty-guided plans). `Mixture` combines any of them per
example; `default_config` mixes them so that training covers every sampling strategy's maps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
MASK_KINDS = ("random", "half", "box", "crop")


class LevelSampler(Protocol):
  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    ...


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or any(s < 1 for s in shape):
    raise ValueError(f"a level-map shape is (B, *grid) with positive sizes, got {shape}")
  return shape


def _spatial_axes(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(range(1, len(shape)))


@dataclasses.dataclass(frozen=True)
class MeanLevel:
  """The distribution of a map's mean level t̄ on [t_min, t_max]: uniform or logit-normal."""

  mean_distribution: str = "uniform"
  logit_loc: float = 0.0
  logit_scale: float = 1.0
  t_min: float = 0.0
  t_max: float = 1.0

  def __post_init__(self):
    if self.mean_distribution not in ("uniform", "logit_normal"):
      raise ValueError(f"mean_distribution must be 'uniform' or 'logit_normal', got "
                       f"{self.mean_distribution!r}")
    if not 0.0 <= self.t_min < self.t_max <= 1.0:
      raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, "
                       f"t_max={self.t_max}")
    if self.logit_scale <= 0:
      raise ValueError(f"logit_scale must be positive, got {self.logit_scale}")

  def sample_mean(self, rng: Array, batch: int) -> Array:
    if self.mean_distribution == "uniform":
      u = jax.random.uniform(rng, (batch,))
    else:
      u = jax.nn.sigmoid(self.logit_loc + self.logit_scale * jax.random.normal(rng, (batch,)))
    return self.t_min + (self.t_max - self.t_min) * u


@dataclasses.dataclass(frozen=True)
class IID:
  """Every token independently uniform on [t_min, t_max] (Diffusion Forcing's sampler)."""

  t_min: float = 0.0
  t_max: float = 1.0

  def __post_init__(self):
    if not 0.0 <= self.t_min < self.t_max <= 1.0:
      raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, "
                       f"t_max={self.t_max}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    return jax.random.uniform(rng, shape, minval=self.t_min, maxval=self.t_max)


@dataclasses.dataclass(frozen=True)
class Homogeneous(MeanLevel):
  """Conventional diffusion: one level t̄ for every token of a map."""

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    tbar = self.sample_mean(rng, shape[0])
    return jnp.broadcast_to(tbar.reshape((-1,) + (1,) * (len(shape) - 1)), shape)


@dataclasses.dataclass(frozen=True)
class Controlled(MeanLevel):
  """The controlled sampler: mean level and spatial spread drawn separately (module docstring)."""

  p_hom: float = 0.25
  kappa: float = 1.0
  exact_mean: bool = True

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.p_hom <= 1.0:
      raise ValueError(f"p_hom must lie in [0, 1], got {self.p_hom}")
    if not 0.0 <= self.kappa <= 1.0:
      raise ValueError(f"kappa must lie in [0, 1] (spread within the range), got {self.kappa}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    batch, ones = shape[0], (1,) * (len(shape) - 1)
    k_mean, k_hom, k_spread, k_tok = jax.random.split(rng, 4)
    tbar = self.sample_mean(k_mean, batch)
    room = jnp.minimum(tbar - self.t_min, self.t_max - tbar)
    delta = self.kappa * jax.random.uniform(k_spread, (batch,)) * room
    delta = jnp.where(jax.random.bernoulli(k_hom, self.p_hom, (batch,)), 0.0, delta)
    d = jax.random.uniform(k_tok, shape, minval=-1.0, maxval=1.0)
    if self.exact_mean:
      # Centre the offsets, then shrink them back into [-1, 1]: the mean is t̄ exactly and every
      # level stays within [t̄ − δ, t̄ + δ] ⊂ [t_min, t_max].
      axes = _spatial_axes(shape)
      d = d - d.mean(axes, keepdims=True)
      d = d / jnp.maximum(1.0, jnp.abs(d).max(axes, keepdims=True))
    t = tbar.reshape((-1, *ones)) + delta.reshape((-1, *ones)) * d
    return jnp.clip(t, self.t_min, self.t_max)


def random_known_mask(rng: Array, shape: Sequence[int], kinds: Sequence[str],
                      known_fraction: tuple[float, float]) -> Array:
  """Token-level boolean masks `[B, *grid]` (True = known), one random kind per example.

  'random': each token known with probability f; 'half': the tokens on one side of a random
  axis; 'box': everything but a random box known (inpainting); 'crop': only a random box known
  (outpainting). f, the known share, is drawn from `known_fraction` for 'random' and sets the
  box size for 'box' and 'crop'.
  """
  shape = _check_shape(shape)
  batch, grid = shape[0], shape[1:]
  for kind in kinds:
    if kind not in MASK_KINDS:
      raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
  lo, hi = known_fraction
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"known_fraction must be (lo, hi) with 0 <= lo <= hi <= 1, got "
                     f"{known_fraction}")
  k_kind, k_frac, k_rand, k_axis, k_side, k_pos = jax.random.split(rng, 6)
  ones = (1,) * len(grid)
  frac = jax.random.uniform(k_frac, (batch,), minval=lo, maxval=hi)
  fr = frac.reshape((-1, *ones))
  masks = {}
  masks["random"] = jax.random.uniform(k_rand, shape) < fr
  # Coordinates of every token, normalised to (0, 1) by token centre.
  coords = [((jnp.arange(g) + 0.5) / g).reshape([1] + [g if a == i else 1
                                                       for a in range(len(grid))])
            for i, g in enumerate(grid)]
  axis = jax.random.randint(k_axis, (batch,), 0, len(grid))
  side = jax.random.bernoulli(k_side, 0.5, (batch,)).reshape((-1, *ones))
  half = jnp.zeros(shape, bool)
  for i, c in enumerate(coords):
    along = jnp.where(side, c < 0.5, c >= 0.5)
    half = jnp.where((axis == i).reshape((-1, *ones)), jnp.broadcast_to(along, shape), half)
  masks["half"] = half
  # A box covering (1 - f) of the grid for 'box' (unknown inside), f for 'crop' (known inside).
  for kind, share in (("box", 1.0 - fr), ("crop", fr)):
    side_len = share ** (1.0 / len(grid))
    k_pos, sub = jax.random.split(k_pos)
    starts = jax.random.uniform(sub, (batch, len(grid))) * (1.0 - side_len.reshape(batch, 1))
    inside = jnp.ones(shape, bool)
    for i, c in enumerate(coords):
      s = starts[:, i].reshape((-1, *ones))
      inside = inside & (c >= s) & (c < s + side_len)
    masks[kind] = ~inside if kind == "box" else inside
  choice = jax.random.randint(k_kind, (batch,), 0, len(kinds)).reshape((-1, *ones))
  out = jnp.zeros(shape, bool)
  for i, kind in enumerate(kinds):
    out = jnp.where(choice == i, masks[kind], out)
  return out


def context_levels(rng: Array, batch: int, p_noisy: float, grid_rank: int) -> Array:
  """Per example the context's level `[B, 1, …]`: 0, or with probability `p_noisy` k ~ U(0, 1)."""
  k_noisy, k_level = jax.random.split(rng)
  noisy = jax.random.bernoulli(k_noisy, p_noisy, (batch,))
  level = jnp.where(noisy, jax.random.uniform(k_level, (batch,)), 0.0)
  return level.reshape((-1,) + (1,) * grid_rank)


@dataclasses.dataclass(frozen=True)
class Masked(MeanLevel):
  """Inpainting-shaped maps: the unknown tokens all at t̄, the known ones (the context) clean.

  With probability `p_noisy_context` the context sits at a level k ~ U(0, 1) drawn
  independently of t̄ (so k ≥ t̄ as often as not) instead of 0: input guidance's second branch
  re-noises the context to k while the unknown tokens are anywhere in their plan. Context at
  k > 0 carries a learnable target (the loss masks only level-0 tokens); at k = 0 it does not.
  """

  kinds: tuple[str, ...] = ("random", "half", "box", "crop")
  known_fraction: tuple[float, float] = (0.2, 0.8)
  p_noisy_context: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "kinds", _as_tuple(self.kinds, str))
    object.__setattr__(self, "known_fraction", _as_tuple(self.known_fraction, float))
    if not self.kinds or any(k not in MASK_KINDS for k in self.kinds):
      raise ValueError(f"kinds must be a non-empty subset of {MASK_KINDS}, got {self.kinds}")
    if not 0.0 <= self.p_noisy_context <= 1.0:
      raise ValueError(f"p_noisy_context must lie in [0, 1], got {self.p_noisy_context}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    k_mean, k_mask, k_level = jax.random.split(rng, 3)
    ones = (1,) * (len(shape) - 1)
    tbar = self.sample_mean(k_mean, shape[0]).reshape((-1, *ones))
    known = random_known_mask(k_mask, shape, self.kinds, self.known_fraction)
    context = context_levels(k_level, shape[0], self.p_noisy_context, len(shape) - 1)
    return jnp.where(known, context, jnp.broadcast_to(tbar, shape))


def _tuple_of_ints(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
  out = (int(value),) * n if isinstance(value, int | np.integer) else tuple(int(v) for v in value)
  if len(out) != n or any(v < 1 for v in out):
    raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}")
  return out


def group_ids(grid: Sequence[int], group_shape: int | Sequence[int]) -> tuple[np.ndarray, tuple]:
  """Token → group index for groups of `group_shape` tokens (edge groups may be smaller).

  Returns:
    (ids `[*grid]` int32 in row-major group order, the group grid shape).
  """
  grid = tuple(int(g) for g in grid)
  shape = _tuple_of_ints(group_shape, len(grid), "group_shape")
  group_grid = tuple(math.ceil(g / s) for g, s in zip(grid, shape))
  idx = np.meshgrid(*[np.arange(g) // s for g, s in zip(grid, shape)], indexing="ij")
  return np.ravel_multi_index(tuple(idx), group_grid).astype(np.int32), group_grid


def spiral_rank(group_grid: Sequence[int]) -> np.ndarray:
  """Centre-out spiral order over a group grid: rank `[K]` of each row-major group.

  Groups are sorted by their Chebyshev distance to the centre (square rings), then by angle in
  the last two axes, so each ring is walked once around, starting from the top.
  """
  group_grid = tuple(group_grid)
  idx = np.stack(np.meshgrid(*[np.arange(g) for g in group_grid], indexing="ij"), -1)
  idx = idx.reshape(-1, len(group_grid)).astype(np.float64)
  centred = idx - (np.asarray(group_grid, np.float64) - 1) / 2
  ring = np.max(np.abs(centred), axis=1)
  if len(group_grid) >= 2:
    angle = np.arctan2(centred[:, -1], -centred[:, -2])
  else:
    angle = np.sign(centred[:, 0])
  order = np.lexsort((np.arange(len(ring)), np.round(angle, 9), np.round(ring, 9)))
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order))
  return rank


def group_shape_for(spec: str, grid: Sequence[int]) -> tuple[int, ...]:
  """A named group layout on `grid`: 'token' (1 per group), 'row' (a whole row of the last
  axis), 'column' (a whole column of the second-to-last axis) or 'block<b>' (b×…×b, clipped
  to the grid) — the layouts the autoregressive plan's `group_shape` takes."""
  grid = tuple(int(g) for g in grid)
  if spec == "token":
    return (1,) * len(grid)
  if spec == "row":
    return (1,) * (len(grid) - 1) + grid[-1:]
  if spec == "column":
    return grid if len(grid) == 1 else (1,) * (len(grid) - 2) + (grid[-2], 1)
  if spec.startswith("block") and spec[5:].isdigit() and int(spec[5:]) >= 1:
    return tuple(min(int(spec[5:]), g) for g in grid)
  raise ValueError(f"unknown group layout {spec!r}; choose from {GROUP_LAYOUTS} or 'block<b>' "
                   "with an integer b >= 1")


GROUP_LAYOUTS = ("token", "row", "column", "block2", "block4")
STAIRCASE_ORDERS = ("raster", "spiral", "random")


@dataclasses.dataclass(frozen=True)
class Staircase:
  """The autoregressive plan at a random moment (docs/method.md, "Autoregressive generation").

  Token groups (one layout of `groups` per example: single tokens, rows, columns or b×b
  blocks, as the sampler's `group_shape` offers) in one of `order`'s orders (raster, spiral
  from the centre, or random, which stands for the most-certain-first order) get slots
  k = 0..K−1. With overlap ρ ~ U(0, max_overlap), the levels are
  t_k = clip(1 − (m − k(1 − ρ)), 0, 1) with m ~ U(0, (K − 1)(1 − ρ) + 1) (in units of the
  steps per group S), so earlier groups are cleaner; ρ = 0 is strictly one group after another,
  ρ → 1 approaches homogeneous maps. With probability `p_context` a random known mask (any of
  `Masked`'s kinds) additionally holds some tokens as context, as autoregressive inpainting and
  outpainting windows have it: clean, or (with probability `p_noisy_context`) re-noised to
  k ~ U(0, 1) as input guidance's second branch has it.
  """

  order: str | tuple[str, ...] = "raster"
  max_overlap: float = 0.5
  groups: str | tuple[str, ...] = ("token",)
  p_context: float = 0.0
  p_noisy_context: float = 0.0

  def __post_init__(self):
    orders = _as_tuple(self.order, str)
    if not orders or any(o not in STAIRCASE_ORDERS for o in orders):
      raise ValueError(f"order must be one or more of {STAIRCASE_ORDERS} (comma-separated), "
                       f"got {self.order!r}")
    object.__setattr__(self, "order", orders[0] if len(orders) == 1 else orders)
    groups = _as_tuple(self.groups, str)
    if not groups:
      raise ValueError(f"groups must name at least one layout of {GROUP_LAYOUTS}")
    for g in groups:
      group_shape_for(g, (1,))  # validates the name
    object.__setattr__(self, "groups", groups)
    if not 0.0 <= self.max_overlap < 1.0:
      raise ValueError(f"max_overlap must lie in [0, 1), got {self.max_overlap}")
    for name in ("p_context", "p_noisy_context"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

  @property
  def orders(self) -> tuple[str, ...]:
    return _as_tuple(self.order, str)

  def _slot_candidates(self, grid: tuple[int, ...]) -> list[tuple[np.ndarray, int, str]]:
    """(token → group id `[N]`, number of groups K, order) for every layout × order."""
    out = []
    for spec in self.groups:
      ids, group_grid = group_ids(grid, group_shape_for(spec, grid))
      for order in self.orders:
        out.append((ids.reshape(-1), math.prod(group_grid), order, group_grid))
    return out

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    batch, grid = shape[0], shape[1:]
    k_rho, k_m, k_perm, k_pick, k_ctx, k_mask, k_level = jax.random.split(rng, 7)
    rho = jax.random.uniform(k_rho, (batch, 1), maxval=self.max_overlap)
    u = jax.random.uniform(k_m, (batch, 1))
    candidates = self._slot_candidates(grid)
    pick = jax.random.randint(k_pick, (batch, 1), 0, len(candidates))
    t = jnp.zeros((batch, math.prod(grid)), jnp.float32)
    for i, (ids, num_groups, order, group_grid) in enumerate(candidates):
      if order == "random":
        keys = jax.random.uniform(jax.random.fold_in(k_perm, i), (batch, num_groups))
        slot = jnp.argsort(jnp.argsort(keys, axis=1), axis=1).astype(jnp.float32)
      else:
        rank = spiral_rank(group_grid) if order == "spiral" else np.arange(num_groups)
        slot = jnp.broadcast_to(jnp.asarray(rank, jnp.float32), (batch, num_groups))
      position = slot[:, ids]  # each token's group slot
      m = u * ((num_groups - 1) * (1.0 - rho) + 1.0)
      t_i = jnp.clip(1.0 - (m - position * (1.0 - rho)), 0.0, 1.0)
      t = jnp.where(pick == i, t_i, t)
    t = t.reshape(shape)
    if self.p_context > 0:
      known = random_known_mask(k_mask, shape, MASK_KINDS, (0.2, 0.8))
      with_context = jax.random.bernoulli(k_ctx, self.p_context, (batch,))
      known = known & with_context.reshape((-1,) + (1,) * len(grid))
      t = jnp.where(known, context_levels(k_level, batch, self.p_noisy_context, len(grid)), t)
    return t


@dataclasses.dataclass(frozen=True)
class SmoothField(MeanLevel):
  """Spatially smooth level fields, like the ones uncertainty-guided plans produce.

  t = clip(t̄ + a·g, 0, 1) with g a unit-variance Gaussian random field (white noise smoothed by
  a Gaussian kernel of length ℓ tokens, log-uniform on [1, max(1, side/2)]), a ~ U(0,
  max_amplitude) and t̄ from `MeanLevel`. Clipping makes whole regions clean (level 0) or
  untouched (level 1) while others are in transition, as when easy regions run ahead.
  """

  max_amplitude: float = 0.6

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.max_amplitude <= 2.0:
      raise ValueError(f"max_amplitude must lie in [0, 2], got {self.max_amplitude}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    batch, grid = shape[0], shape[1:]
    ones = (1,) * len(grid)
    k_mean, k_amp, k_len, k_noise = jax.random.split(rng, 4)
    tbar = self.sample_mean(k_mean, batch).reshape((-1, *ones))
    amp = jax.random.uniform(k_amp, (batch,), maxval=self.max_amplitude).reshape((-1, *ones))
    log_len = jax.random.uniform(k_len, (batch,)) * math.log(max(1.0, max(grid) / 2))
    length = jnp.exp(log_len)
    g = jax.random.normal(k_noise, shape)
    for axis, size in enumerate(grid, start=1):
      pos = jnp.arange(size, dtype=jnp.float32)
      kernel = jnp.exp(-0.5 * jnp.square((pos[:, None] - pos[None, :]) / length[:, None, None]))
      g = jnp.moveaxis(jnp.einsum("bij,bj...->bi...", kernel, jnp.moveaxis(g, axis, 1)), 1, axis)
    axes = _spatial_axes(shape)
    g = g - g.mean(axes, keepdims=True)
    g = g / jnp.maximum(g.std(axes, keepdims=True), 1e-6)
    return jnp.clip(tbar + amp * g, self.t_min, self.t_max)


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Per example, one component drawn with probability proportional to its weight."""

  components: tuple[tuple[float, LevelSampler], ...]

  def __post_init__(self):
    if not self.components:
      raise ValueError("a mixture needs at least one component")
    if any(w < 0 for w, _ in self.components) or sum(w for w, _ in self.components) <= 0:
      raise ValueError(f"mixture weights must be >= 0 with a positive sum, got "
                       f"{[w for w, _ in self.components]}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    weights = jnp.array([w for w, _ in self.components], jnp.float32)
    keys = jax.random.split(rng, len(self.components) + 1)
    choice = jax.random.categorical(keys[0], jnp.log(weights), shape=(shape[0],))
    choice = choice.reshape((-1,) + (1,) * (len(shape) - 1))
    t = jnp.zeros(shape, jnp.float32)
    for i, (_, sampler) in enumerate(self.components):
      t = jnp.where(choice == i, sampler(keys[i + 1], shape), t)
    return t


SAMPLERS: dict[str, type] = {
    "iid": IID, "homogeneous": Homogeneous, "controlled": Controlled, "mask": Masked,
    "staircase": Staircase, "smooth": SmoothField,
}


def _as_tuple(value: Any, kind: type) -> tuple:
  if isinstance(value, str):
    value = [v.strip() for v in value.split(",") if v.strip()]
  return tuple(kind(v) for v in value)


def from_config(config: Mapping[str, Any] | ml_collections.ConfigDict) -> LevelSampler:
  """Builds a sampler from `{'name': ..., **fields}`; a mixture takes
  `{'name': 'mixture', 'components': {key: {'name': ..., 'weight': w, **fields}}}`."""
  config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  name = config.pop("name", None)
  if name == "mixture":
    components = config.pop("components", None)
    if config:
      raise ValueError(f"unknown level_sampler fields for 'mixture': {sorted(config)}")
    if not components:
      raise ValueError("level_sampler 'mixture' needs a non-empty `components` mapping")
    parts = []
    for key, comp in dict(components).items():
      comp = dict(comp)
      weight = float(comp.pop("weight", 1.0))
      comp.setdefault("name", key)
      if weight > 0:
        parts.append((weight, from_config(comp)))
    return Mixture(tuple(parts))
  if name not in SAMPLERS:
    raise ValueError(f"unknown level_sampler name {name!r}; choose one of "
                     f"{sorted([*SAMPLERS, 'mixture'])}")
  cls = SAMPLERS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ValueError(f"unknown level_sampler fields for {name!r}: {unknown}; valid fields are "
                     f"{sorted(fields)}")
  return cls(**config)


def default_config() -> ml_collections.ConfigDict:
  """The recipe's sampler: controlled maps, plus every map family the samplers use.

  Mask maps (inpainting; half of them with the context re-noised as input guidance does),
  grouped staircases (every autoregressive layout and order, overlap up to 0.9, a quarter with
  known context, clean or re-noised) and smooth fields (uncertainty-guided plans).
  `docs/level_statistics.md` shows that these cover the maps of every sampling strategy.
  """
  return ml_collections.ConfigDict({
      "name": "mixture",
      "components": {
          "controlled": {"name": "controlled", "weight": 0.5, "mean_distribution": "uniform",
                         "p_hom": 0.25, "kappa": 1.0, "exact_mean": True},
          "mask": {"name": "mask", "weight": 0.2, "kinds": "random,half,box,crop",
                   "known_fraction": (0.2, 0.8), "p_noisy_context": 0.5},
          "staircase": {"name": "staircase", "weight": 0.2, "order": "raster,spiral,random",
                        "groups": "token,row,block2,block4", "max_overlap": 0.9,
                        "p_context": 0.25, "p_noisy_context": 0.5},
          "smooth": {"name": "smooth", "weight": 0.1, "max_amplitude": 0.6},
      },
  })


def legacy_config() -> ml_collections.ConfigDict:
  """The recipe's sampler before the sampling-map components (issue 18), for comparisons:
  per-token raster staircases with ρ ≤ 0.5 and mask maps with clean context only."""
  return ml_collections.ConfigDict({
      "name": "mixture",
      "components": {
          "controlled": {"name": "controlled", "weight": 0.6, "mean_distribution": "uniform",
                         "p_hom": 0.25, "kappa": 1.0, "exact_mean": True},
          "mask": {"name": "mask", "weight": 0.3, "kinds": "random,half,box,crop",
                   "known_fraction": (0.2, 0.8)},
          "staircase": {"name": "staircase", "weight": 0.1, "order": "raster",
                        "max_overlap": 0.5},
      },
  })
