"""Training noise-level samplers: which level maps the network sees during training.

Each sampler is a small frozen dataclass called as `sampler(rng, shape) -> t` with
`shape = (B, *grid)` and `t` in [0, 1]. They are selected from a config (`from_config`).

Independent `t_i ~ U(0, 1)` (`IID`) almost never gives the homogeneous maps that sampling starts
from, so the **controlled sampler** sets the average level and its spatial spread separately:
`t̄ ~ p(t̄)`; with probability `p_hom` every `t_i = t̄` exactly; otherwise
`δ = κ·u·min(t̄ − t_min, t_max − t̄)`, `u ~ U(0, 1)`, and `t_i ~ U(t̄ − δ, t̄ + δ)` (optionally
re-centred so the mean is exactly `t̄`). Structured components match sampling-time use: `Masked`
(known tokens at 0, the rest at `t̄`, as in inpainting) and `Staircase` (the autoregressive plan
at a random moment). `Mixture` combines any of them per example.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

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


@dataclasses.dataclass(frozen=True)
class Masked(MeanLevel):
  """Inpainting-shaped maps: known tokens at level 0, the unknown ones all at t̄."""

  kinds: tuple[str, ...] = ("random", "half", "box", "crop")
  known_fraction: tuple[float, float] = (0.2, 0.8)

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "kinds", _as_tuple(self.kinds, str))
    object.__setattr__(self, "known_fraction", _as_tuple(self.known_fraction, float))
    if not self.kinds or any(k not in MASK_KINDS for k in self.kinds):
      raise ValueError(f"kinds must be a non-empty subset of {MASK_KINDS}, got {self.kinds}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    k_mean, k_mask = jax.random.split(rng)
    tbar = self.sample_mean(k_mean, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    known = random_known_mask(k_mask, shape, self.kinds, self.known_fraction)
    return jnp.where(known, 0.0, jnp.broadcast_to(tbar, shape))


@dataclasses.dataclass(frozen=True)
class Staircase:
  """The autoregressive plan at a random moment (METHOD.md, autoregressive sampling).

  Tokens in raster (or a random) order k = 0..K−1 with overlap ρ ~ U(0, max_overlap):
  t_k = clip(1 − (m − k(1 − ρ)), 0, 1) with m ~ U(0, (K − 1)(1 − ρ) + 1), so earlier tokens are
  cleaner; ρ = 0 is strictly one token after another, ρ → 1 approaches homogeneous maps.
  """

  order: str = "raster"
  max_overlap: float = 0.5

  def __post_init__(self):
    if self.order not in ("raster", "random"):
      raise ValueError(f"order must be 'raster' or 'random', got {self.order!r}")
    if not 0.0 <= self.max_overlap < 1.0:
      raise ValueError(f"max_overlap must lie in [0, 1), got {self.max_overlap}")

  def __call__(self, rng: Array, shape: Sequence[int]) -> Array:
    shape = _check_shape(shape)
    batch, num_tokens = shape[0], math.prod(shape[1:])
    k_rho, k_m, k_perm = jax.random.split(rng, 3)
    rho = jax.random.uniform(k_rho, (batch, 1), maxval=self.max_overlap)
    position = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.float32), (batch, num_tokens))
    if self.order == "random":
      keys = jax.random.split(k_perm, batch)
      position = jax.vmap(jax.random.permutation)(keys, position)
    length = (num_tokens - 1) * (1.0 - rho) + 1.0
    m = jax.random.uniform(k_m, (batch, 1)) * length
    t = jnp.clip(1.0 - (m - position * (1.0 - rho)), 0.0, 1.0)
    return t.reshape(shape)


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
    "staircase": Staircase,
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
  """The recipe's sampler: controlled maps, plus mask and staircase maps for inpainting / AR."""
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
