"""The paper's network: an ADM-style U-Net whose every residual block reads a spatial level map.

Each token's level (and the example's class) is embedded per token, `e_i = emb(t_i) + emb(y)`, and
every residual block applies spatial FiLM, `h ← (1 + s) ⊙ GroupNorm(h) + b` with
`(s, b) = W · SiLU(e) + w₀` evaluated at every position of the block's resolution (a 1×1
convolution of the conditioning map). At coarser resolutions the conditioning is the average of
the finer positions' — equivalently the FiLM parameters are average-pooled, since W is affine —
and at resolutions finer than the level map it is repeated (exact for patch levels, and computed
at the level map's resolution, not the pixels'). Scalar levels `t: [B]` give ADM's U-Net with
`use_scale_shift_norm`.

Blocks follow ADM (Dhariwal & Nichol 2021): [GroupNorm, SiLU, conv] → FiLM → [SiLU, dropout,
zero-init conv] + skip; attention blocks at chosen resolutions; strided-conv downsampling and
nearest + conv upsampling; the output conv is zero-initialised, so the prediction starts at 0.
The same code runs 1-D (`[B, L, C]`) and 2-D (`[B, H, W, C]`) data. `remat` recomputes every
residual(+attention) block in the backward pass under a `jax.checkpoint` policy (less memory).

Like the DiT, at inference the FiLM parameters are computed once per distinct level (`slots.py`)
and mixed by each position's pooled slot weights, which is the same function at a fraction of the
dense cost; a batch of homogeneous maps runs the scalar-level network, and any example with more
than `level_slots` distinct levels sends the batch down the dense path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from asyncpatch_jax.diffusion.parametrization import check_parametrization
from asyncpatch_jax.diffusion.schedules import Schedule
from asyncpatch_jax.models import common, precision
from asyncpatch_jax.models.embeddings import ClassEmbedding, LevelEmbedding
from asyncpatch_jax.models.precision import Linear
from asyncpatch_jax.models.slots import LevelSlots, choose_path, find_level_slots

Array = jax.Array
_zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class SpatialCondition:
  """The FiLM input at one resolution, in one of three forms.

  - 'scalar': `features: [B, D]`, the same for every position.
  - 'dense': `features: [B, *R, D]` at a compact resolution R, repeated `repeat`× per axis.
  - 'slots': `features: [B, K, D]` per slot and `weights: [B, *R, K]`, each position's pooled
    slot fractions (rows sum to 1), repeated `repeat`× per axis.
  `features` hold SiLU(e), so `film(W)` = the pooled `W · SiLU(e) + w₀`.
  """

  kind: str
  features: Array
  weights: Array | None = None
  repeat: int = 1

  def film(self, linear: nnx.Linear, num_spatial: int) -> Array:
    """`linear` applied to the conditioning map → `[B, *res, F]` (or `[B, 1.., F]`)."""
    rows = linear(self.features)
    if self.kind == "scalar":
      return rows.reshape(rows.shape[0], *(1,) * num_spatial, rows.shape[-1])
    if self.kind == "slots":
      rows = jnp.einsum("b...k,bkf->b...f", self.weights.astype(rows.dtype), rows)
    return common.repeat_spatial(rows, self.repeat, num_spatial)


def _pool_to(a: Array, level_patch: int, factor: int, num_spatial: int) -> tuple[Array, int]:
  """A token-resolution map pooled to the resolution `factor` (≥ 1) times below the data's.

  Returns `(compact, repeat)` with the map at that resolution = `compact` repeated `repeat`×.
  """
  if level_patch % factor == 0:
    return a, level_patch // factor
  if factor % level_patch == 0:
    return common.avg_pool_spatial(a, factor // level_patch), 1
  full = common.repeat_spatial(a, level_patch, num_spatial)
  return common.avg_pool_spatial(full, factor), 1


class ResBlock(nnx.Module):
  """ADM residual block with spatial FiLM (scale-shift norm) from the level map."""

  def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, num_spatial: int,
               groups: int, dropout: float, dtype, rngs: nnx.Rngs):
    kernel = (3,) * num_spatial
    self.num_spatial = num_spatial
    self.norm1 = nnx.GroupNorm(in_channels, num_groups=groups, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(in_channels, out_channels, kernel, padding="SAME", dtype=dtype,
                          rngs=rngs)
    self.film = Linear(emb_dim, 2 * out_channels, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_channels, num_groups=groups, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv2 = nnx.Conv(out_channels, out_channels, kernel, padding="SAME", kernel_init=_zeros,
                          dtype=dtype, rngs=rngs)
    self.skip = (None if in_channels == out_channels else
                 nnx.Conv(in_channels, out_channels, (1,) * num_spatial, dtype=dtype, rngs=rngs))

  def __call__(self, x: Array, cond: SpatialCondition, deterministic: bool) -> Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    scale, shift = jnp.split(cond.film(self.film, self.num_spatial), 2, axis=-1)
    h = self.norm2(h) * (1 + scale) + shift
    h = self.conv2(self.dropout(nnx.silu(h), deterministic=deterministic))
    return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
  """Multi-head self-attention over all positions, zero-initialised output projection."""

  def __init__(self, channels: int, num_heads: int, *, groups: int, dtype,
               implementation: str | None, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f"U-Net attention: {channels} channels not divisible by num_heads "
                       f"{num_heads}")
    self.num_heads = num_heads
    self.implementation = implementation
    self.norm = nnx.GroupNorm(channels, num_groups=groups, dtype=dtype, rngs=rngs)
    self.qkv = Linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
    self.proj = Linear(channels, channels, kernel_init=_zeros, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, c = x.shape[0], x.shape[-1]
    qkv = self.qkv(self.norm(x)).reshape(b, -1, 3, self.num_heads, c // self.num_heads)
    h = precision.attention(qkv, implementation=self.implementation)
    return x + self.proj(h.reshape(b, -1, c)).reshape(x.shape)


class Downsample(nnx.Module):
  def __init__(self, channels: int, *, num_spatial: int, dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3,) * num_spatial, strides=2,
                         padding=((1, 1),) * num_spatial, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Upsample(nnx.Module):
  def __init__(self, channels: int, *, num_spatial: int, dtype, rngs: nnx.Rngs):
    self.num_spatial = num_spatial
    self.conv = nnx.Conv(channels, channels, (3,) * num_spatial, padding="SAME", dtype=dtype,
                         rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(common.repeat_spatial(x, 2, self.num_spatial))


class ResAttn(nnx.Module):
  """A residual block at resolution `level` (0 = the data's), optionally followed by attention."""

  def __init__(self, res: ResBlock, attn: AttentionBlock | None, level: int):
    self.res = res
    self.attn = attn
    self.level = level

  def __call__(self, x: Array, conds: Sequence[SpatialCondition], deterministic: bool) -> Array:
    x = self.res(x, conds[self.level], deterministic)
    return x if self.attn is None else self.attn(x)


class UNet(nnx.Module):
  """ADM U-Net with per-token levels through spatial FiLM. Arguments mirror `default_config()`.

  Args:
    data_shape: `(H, W, C)` or `(L, C)`, the input without batch.
    level_patch_size: the level map's patch `p` (1: per pixel).
    channels, channel_mult, num_res_blocks: width `channels · channel_mult[i]` at resolution
      level i, each spatial size halved between levels.
    attention_resolutions: spatial sizes (along the first spatial axis) that get attention.
    level_slots: K, distinct levels per example for the slot path at inference (0: dense only).
    remat: '' or a `common.REMAT_POLICIES` name, applied to every residual(+attention) block.
  """

  def __init__(self, *, data_shape: Sequence[int], level_patch_size: int = 1,
               channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
               num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (16,),
               dropout: float = 0.1, num_heads: int = 4, norm_groups: int = 32,
               num_classes: int = 0, uncertainty: bool = False, parametrization: str = "eps",
               level_embedding: str = "t", schedule: Schedule | None = None,
               level_slots: int = 8, dtype: str = "float32", attention_impl: str | None = None,
               remat: str = "", rngs: nnx.Rngs):
    check_parametrization(parametrization)
    self.remat = common.check_remat(remat)
    self.data_shape = tuple(int(d) for d in data_shape)
    self.level_grid = common.spatial_grid(self.data_shape, level_patch_size, "level patch size")
    num_levels = len(channel_mult)
    common.spatial_grid(self.data_shape, 2 ** (num_levels - 1),
                        f"U-Net's total downsampling factor (2^{num_levels - 1} for "
                        f"{num_levels} resolutions)")
    widths = sorted({channels * m for m in channel_mult})
    bad = [w for w in widths if w % norm_groups]
    if bad:
      raise ValueError(f"U-Net widths {bad} are not divisible by norm_groups {norm_groups}")
    if schedule is None and (uncertainty or level_embedding == "log_snr"):
      raise ValueError("U-Net: the uncertainty head and log-SNR embedding need the schedule")
    if level_slots < 0:
      raise ValueError(f"level_slots must be >= 0, got {level_slots}")
    dtype = common.resolve_dtype(dtype)
    self.compute_dtype = dtype
    self.num_spatial = n = len(self.data_shape) - 1
    self.level_patch_size = int(level_patch_size)
    self.num_levels = num_levels
    self.channels = self.data_shape[-1]
    self.num_classes = int(num_classes)
    self.uncertainty = bool(uncertainty)
    self.parametrization = parametrization
    self.schedule = schedule
    self.level_slots = int(level_slots)
    self.num_tokens = math.prod(self.level_grid)
    self.num_slots = max(1, min(self.level_slots, self.num_tokens))
    emb_dim = 4 * channels
    attention_resolutions = {int(r) for r in attention_resolutions}
    kw = dict(dtype=dtype, rngs=rngs)
    res_kw = dict(num_spatial=n, groups=norm_groups, dropout=dropout, **kw)

    def maybe_attn(ch: int, level: int) -> AttentionBlock | None:
      if self.data_shape[0] // 2**level not in attention_resolutions:
        return None
      return AttentionBlock(ch, num_heads, groups=norm_groups, implementation=attention_impl,
                            **kw)

    self.level_embed = LevelEmbedding(emb_dim, kind=level_embedding, schedule=schedule, **kw)
    self.class_embed = (ClassEmbedding(num_classes, emb_dim, init_std=1.0, **kw)
                        if num_classes else None)
    self.input_conv = nnx.Conv(self.channels, channels, (3,) * n, padding="SAME", **kw)
    encoder, skip_channels, ch = [], [channels], channels
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        encoder.append(ResAttn(ResBlock(ch, channels * mult, emb_dim, **res_kw),
                               maybe_attn(channels * mult, level), level))
        ch = channels * mult
        skip_channels.append(ch)
      if level != num_levels - 1:
        encoder.append(Downsample(ch, num_spatial=n, **kw))
        skip_channels.append(ch)
    self.encoder = nnx.List(encoder)
    last = num_levels - 1
    self.middle = nnx.List([
        ResAttn(ResBlock(ch, ch, emb_dim, **res_kw),
                AttentionBlock(ch, num_heads, groups=norm_groups, implementation=attention_impl,
                               **kw), last),
        ResAttn(ResBlock(ch, ch, emb_dim, **res_kw), None, last)])
    decoder = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for _ in range(num_res_blocks + 1):
        decoder.append(ResAttn(ResBlock(ch + skip_channels.pop(), channels * mult, emb_dim,
                                        **res_kw), maybe_attn(channels * mult, level), level))
        ch = channels * mult
      if level:
        decoder.append(Upsample(ch, num_spatial=n, **kw))
    self.decoder = nnx.List(decoder)
    self.out_norm = nnx.GroupNorm(ch, num_groups=norm_groups, **kw)
    out_channels = 2 * self.channels if uncertainty else self.channels
    self.out_conv = nnx.Conv(ch, out_channels, (3,) * n, padding="SAME", kernel_init=_zeros,
                             **kw)

  # The conditioning at every resolution, in three equivalent forms (see SpatialCondition).
  def scalar_conditions(self, t: Array, y: Array | None) -> list[SpatialCondition]:
    e = self.level_embed(t)
    cond = SpatialCondition("scalar", nnx.silu(e if y is None else e + y))
    return [cond] * self.num_levels

  def dense_conditions(self, t: Array, y: Array | None) -> list[SpatialCondition]:
    e = self.level_embed(t)
    if y is not None:
      e = e + y.reshape(y.shape[0], *(1,) * self.num_spatial, y.shape[-1])
    s = nnx.silu(e)
    conds = []
    for level in range(self.num_levels):
      features, repeat = _pool_to(s, self.level_patch_size, 2**level, self.num_spatial)
      conds.append(SpatialCondition("dense", features, repeat=repeat))
    return conds

  def slot_conditions(self, t: Array, slots: LevelSlots, y: Array | None
                      ) -> list[SpatialCondition]:
    e = self.level_embed(slots.values)
    s = nnx.silu(e if y is None else e + y[:, None])
    num_slots = slots.values.shape[-1]
    one_hot = jax.nn.one_hot(slots.index, num_slots, dtype=jnp.float32)
    one_hot = one_hot.reshape(*t.shape, num_slots)
    conds = []
    for level in range(self.num_levels):
      weights, repeat = _pool_to(one_hot, self.level_patch_size, 2**level, self.num_spatial)
      conds.append(SpatialCondition("slots", s, weights, repeat))
    return conds

  def forward(self, z: Array, conds: Sequence[SpatialCondition], deterministic: bool) -> Array:
    """The U-Net on `z` under given conditioning → `[B, *spatial, C_out]`."""
    block = common.rematerialised(
        lambda layer, h: layer(h, conds, deterministic), self.remat)
    h = self.input_conv(z.astype(self.compute_dtype))
    skips = [h]
    for layer in self.encoder:
      h = block(layer, h) if isinstance(layer, ResAttn) else layer(h)
      skips.append(h)
    for layer in self.middle:
      h = block(layer, h)
    for layer in self.decoder:
      if isinstance(layer, ResAttn):
        h = block(layer, jnp.concatenate([h, skips.pop()], axis=-1))
      else:
        h = layer(h)
    return self.out_conv(nnx.silu(self.out_norm(h)))

  def __call__(self, z: Array, t: Array, labels: Array | None = None, *,
               deterministic: bool = True) -> common.ModelOutput:
    """Predicts the output (and log-variance) for `z: [B, *spatial, C]` at levels `t`.

    `deterministic=False` turns dropout on (training, dense path). With `deterministic=True`
    and a level map, the cheapest exact path runs (`slots.choose_path`): scalar-level FiLM if
    every example is homogeneous, the slot path if each has at most `level_slots` levels, else
    dense.
    """
    common.check_data(z, self.data_shape, "U-Net")
    batch = z.shape[0]
    t = common.check_level_map(t, batch, self.level_grid, self.level_patch_size, "U-Net")
    labels = common.check_labels(labels, batch, self.num_classes, "U-Net")
    y = None if self.class_embed is None else self.class_embed(labels)
    if t.ndim == 1:
      out = self.forward(z, self.scalar_conditions(t, y), deterministic)
    elif not deterministic or self.level_slots == 0:
      out = self.forward(z, self.dense_conditions(t, y), deterministic)
    else:
      slots = find_level_slots(t.reshape(batch, -1), self.num_slots)
      sparse = lambda: self.forward(z, self.slot_conditions(t, slots, y), deterministic)
      out = choose_path(
          slots,
          homogeneous=lambda: self.forward(
              z, self.scalar_conditions(slots.values[:, 0], y), deterministic),
          sparse=sparse if self.level_slots < self.num_tokens else None,  # else no cheaper
          dense=lambda: self.forward(z, self.dense_conditions(t, y), deterministic))
    return common.split_head(out, t, channels=self.channels, uncertainty=self.uncertainty,
                             schedule=self.schedule, parametrization=self.parametrization,
                             data_shape=self.data_shape, level_patch=self.level_patch_size)
