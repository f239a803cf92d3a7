"""DiT with per-token adaLN-Zero: every token is modulated by its own level (Peebles & Xie 2023).

The architecture, initialisation and parameter count are DiT's: patch embedding, fixed sin-cos
position embedding, blocks of [adaLN-modulated attention, adaLN-modulated MLP] with zero-init
gates, and an adaLN final layer (zero init) that unpatchifies. The one change: DiT's conditioning
vector `c = emb(t) + emb(y)` is per example; here `c_i = emb(t_i) + emb(y)` is per token, so each
token's shift/scale/gate come from its own noise level. Scalar levels `t: [B]` give exactly DiT.

Per-token modulation done densely costs ~1.5× DiT's FLOPs; see `slots.py` for how the same
function is computed once per distinct level instead (`level_slots` = K), with a dense fallback.
Training sees continuous per-token maps, where slots don't apply; `adaln='single'` is the other
remedy, an architecture choice: PixArt-α's adaLN-single (Chen et al. 2023), one `d → 6d`
projection of the conditioning shared by all blocks, each block adding its own learned `6d`
table (zero-initialised, so every block still starts as the identity, as in adaLN-Zero), and a
final layer modulated by its `2d` table plus the conditioning itself. Per-token conditioning
then costs one projection instead of `depth + 1` (+5% FLOPs over DiT at S/2 instead of +47%),
and the network has about `(depth − 1) · 6d²` fewer parameters than DiT's (22.8 M vs 32.9 M
at S/2).

Training options that change speed and memory, not the function: `remat` (recompute each block
in the backward pass under a `jax.checkpoint` policy) and `scan_layers` (the blocks' parameters
stacked on a leading depth axis and run by `nnx.scan`, so a deep DiT compiles one block instead
of `depth`; the parameter tree, and so checkpoints, differ from the unrolled model's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asyncpatch_jax.diffusion.parametrization import check_parametrization
from asyncpatch_jax.diffusion.schedules import Schedule
from asyncpatch_jax.models import common, precision
from asyncpatch_jax.models.embeddings import SCHEDULE_EMBEDDINGS, ClassEmbedding, LevelEmbedding
from asyncpatch_jax.models.precision import Linear
from asyncpatch_jax.models.slots import LevelSlots, choose_path, find_level_slots, gather_slots

Array = jax.Array
ADALN_KINDS = ("block", "single")
# (hidden size, depth, heads), from DiT's Table 1.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


class Conditioning(NamedTuple):
  """SiLU(c) at `R` rows per example, and how tokens read them.

  `rows: [B, R, d]` with R = 1 (scalar levels: broadcast), R = N (dense: one row per token) or
  R = K (slots: token i reads row `index[b, i]`). `shared` (adaLN-single only): the shared
  projection's modulation per token, computed once for all blocks, as its six `[B, N or 1, d]`
  chunks (shift, scale, gate of the attention, then of the MLP). Chunks, not one `[.., 6d]`
  array: each block then adds its table chunk by chunk, and the backward pass never
  concatenates a `[B, N, 6d]` gradient per block.
  """

  rows: Array
  index: Array | None = None
  shared: tuple[Array, ...] | None = None

  def per_token(self, rows: Array) -> Array:
    """Maps a row-wise function's output `[B, R, D]` to tokens: `[B, N, D]` or `[B, 1, D]`."""
    return rows if self.index is None else gather_slots(rows, self.index)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale) + shift


def sincos_position_embedding(grid: Sequence[int], dim: int) -> np.ndarray:
  """DiT's fixed sin-cos position embedding for a 1-D or 2-D token grid, `[prod(grid), dim]`."""

  def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  if len(grid) == 1:
    if dim % 2:
      raise ValueError(f"1-D position embedding needs an even hidden size, got {dim}")
    return one_axis(dim, np.arange(grid[0])).astype(np.float32)
  if dim % 4:
    raise ValueError(f"2-D position embedding needs a hidden size divisible by 4, got {dim}")
  coords = np.meshgrid(np.arange(grid[1]), np.arange(grid[0]))  # as DiT: w first
  return np.concatenate([one_axis(dim // 2, coords[0]), one_axis(dim // 2, coords[1])],
                        axis=1).astype(np.float32)


def patchify(x: Array, patch: int) -> Array:
  """`[B, *S, C]` → `[B, N, p^n C]`, tokens in row-major order of the `S/p` grid."""
  b, *spatial, c = x.shape
  split = [b]
  for s in spatial:
    split += [s // patch, patch]
  x = x.reshape(*split, c)
  n = len(spatial)
  x = x.transpose(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)
  return x.reshape(b, int(np.prod(spatial)) // patch**n, patch**n * c)


def unpatchify(x: Array, grid: Sequence[int], patch: int) -> Array:
  """The inverse of `patchify`: `[B, N, p^n C]` → `[B, *grid·p, C]`."""
  b, n = x.shape[0], len(grid)
  c = x.shape[-1] // patch**n
  x = x.reshape(b, *grid, *(patch,) * n, c)
  order = [0]
  for axis in range(n):
    order += [1 + axis, 1 + n + axis]
  x = x.transpose(*order, 2 * n + 1)
  return x.reshape(b, *(g * patch for g in grid), c)


class Attention(nnx.Module):
  """Multi-head self-attention (fused qkv with bias, output projection)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, implementation: str | None,
               rngs: nnx.Rngs, out_init=_xavier):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = Linear(dim, 3 * dim, kernel_init=_xavier, dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim, kernel_init=out_init, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    h = precision.attention(qkv, implementation=self.implementation)
    return self.proj(h.reshape(b, n, d))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = Linear(dim, hidden, kernel_init=_xavier, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, dim, kernel_init=_xavier, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(precision.gelu(self.fc1(x)))


class DiTBlock(nnx.Module):
  """adaLN-Zero block. `adaln='block'`: its 6 modulation vectors are its own projection of each
  conditioning row (DiT); 'single': the shared modulation plus the block's `6d` table."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, dtype,
               attention_impl: str | None, adaln: str = "block", rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype,
                               rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, implementation=attention_impl, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype,
                               rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    if adaln == "block":
      self.adaln = Linear(dim, 6 * dim, kernel_init=_zeros, bias_init=_zeros, dtype=dtype,
                          rngs=rngs)
    else:
      self.adaln = None
      self.table = nnx.Param(jnp.zeros((6 * dim,), jnp.float32))

  def __call__(self, x: Array, cond: Conditioning) -> Array:
    if self.adaln is not None:
      m = jnp.split(cond.per_token(self.adaln(cond.rows)), 6, axis=-1)
    else:
      m = [precision.add_bias(s, t) for s, t in zip(cond.shared, jnp.split(self.table[...], 6))]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m
    x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def _run_block(block: DiTBlock, x: Array, cond: Conditioning) -> Array:
  return block(x, cond)


def stack_blocks(blocks: Sequence[nnx.Module]) -> nnx.Module:
  """Modules of one structure → one module whose every array has a leading `len(blocks)` axis.

  Stacking the blocks the unrolled model would build keeps their initialisation identical.
  """
  graphdef, *_ = nnx.split(blocks[0])
  states = [nnx.state(b) for b in blocks]
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def unstack_blocks(stacked: nnx.Module) -> list[nnx.Module]:
  """The inverse of `stack_blocks`: the per-layer modules of a stacked one."""
  graphdef, state = nnx.split(stacked)
  depth = jax.tree.leaves(state)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(depth)]


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) then the output projection. `adaln='single'`: shift and scale are the
  layer's `2d` table plus the conditioning row itself (PixArt-α's final layer)."""

  def __init__(self, dim: int, out_features: int, *, dtype, adaln: str = "block",
               rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype,
                              rngs=rngs)
    if adaln == "block":
      self.adaln = Linear(dim, 2 * dim, kernel_init=_zeros, bias_init=_zeros, dtype=dtype,
                          rngs=rngs)
    else:
      self.adaln = None
      self.table = nnx.Param(jnp.zeros((2 * dim,), jnp.float32))
    self.linear = Linear(dim, out_features, kernel_init=_zeros, bias_init=_zeros,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x: Array, cond: Conditioning) -> Array:
    if self.adaln is not None:
      m = cond.per_token(self.adaln(cond.rows))
    else:
      m = precision.add_bias(cond.per_token(jnp.tile(cond.rows, 2)), self.table[...])
    shift, scale = jnp.split(m, 2, axis=-1)
    return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nnx.Module):
  """DiT with per-token levels. See the module docstring; arguments mirror `default_config()`.

  Args:
    data_shape: `(H, W, C)` or `(L, C)`, the input without batch.
    level_patch_size: the level map's patch `p_l`; it must be a multiple of the DiT patch `p`
      (each level then covers `(p_l/p)^n` DiT tokens): a DiT token reads one level.
    patch_size: the DiT patch `p`.
    level_slots: K, the distinct levels per example handled by the slot path at inference
      (`deterministic=True`, see `__call__`); 0 always takes the dense per-token path.
    remat: '' or a `common.REMAT_POLICIES` name, applied to every block.
    scan_layers: run the blocks as one `nnx.scan` over stacked parameters.
    adaln: 'block' (DiT: every block projects the conditioning) or 'single' (PixArt-α's
      adaLN-single: one shared projection plus per-block tables; see the module docstring).
  """

  def __init__(self, *, data_shape: Sequence[int], level_patch_size: int, patch_size: int = 2,
               hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
               mlp_ratio: float = 4.0, num_classes: int = 0, uncertainty: bool = False,
               parametrization: str = "eps", level_embedding: str = "t",
               schedule: Schedule | None = None, level_slots: int = 8, dtype: str = "float32",
               attention_impl: str | None = None, remat: str = "", scan_layers: bool = False,
               adaln: str = "block", rngs: nnx.Rngs):
    check_parametrization(parametrization)
    if adaln not in ADALN_KINDS:
      raise ValueError(f"unknown DiT adaln {adaln!r}; choose one of {ADALN_KINDS}")
    self.adaln = adaln
    self.remat = common.check_remat(remat)
    self.scan_layers = bool(scan_layers)
    self.data_shape = tuple(int(d) for d in data_shape)
    self.grid = common.spatial_grid(self.data_shape, patch_size, "DiT patch size")
    self.level_grid = common.spatial_grid(self.data_shape, level_patch_size, "level patch size")
    if level_patch_size % patch_size:
      raise ValueError(
          f"DiT: the level patch size {level_patch_size} must be a multiple of the DiT patch "
          f"size {patch_size}, so that every DiT token has one level; use level_patch_size="
          f"{patch_size} (one level per DiT token) or a multiple of it")
    if schedule is None and (uncertainty or level_embedding in SCHEDULE_EMBEDDINGS):
      raise ValueError(f"DiT: the uncertainty head and the level embeddings "
                       f"{SCHEDULE_EMBEDDINGS} need the schedule")
    if level_slots < 0:
      raise ValueError(f"level_slots must be >= 0, got {level_slots}")
    compute_dtype = common.resolve_dtype(dtype)
    self.patch_size = int(patch_size)
    self.level_patch_size = int(level_patch_size)
    self.channels = self.data_shape[-1]
    self.hidden_size = int(hidden_size)
    self.num_classes = int(num_classes)
    self.uncertainty = bool(uncertainty)
    self.parametrization = parametrization
    self.schedule = schedule
    self.level_slots = int(level_slots)
    self.num_tokens = int(np.prod(self.grid))
    self.depth = int(depth)
    self.mlp_hidden = int(hidden_size * mlp_ratio)
    out_channels = 2 * self.channels if uncertainty else self.channels
    n = len(self.grid)
    self.out_features = patch_size**n * out_channels

    self.patch_embed = Linear(patch_size**n * self.channels, hidden_size,
                              kernel_init=_xavier, dtype=compute_dtype, rngs=rngs)
    self.level_embed = LevelEmbedding(hidden_size, kind=level_embedding, schedule=schedule,
                                      dtype=compute_dtype, init_std=0.02, rngs=rngs)
    self.class_embed = (ClassEmbedding(num_classes, hidden_size, dtype=compute_dtype, rngs=rngs)
                        if num_classes else None)
    if depth < 1:
      raise ValueError(f"DiT depth must be >= 1, got {depth}")
    blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio, dtype=compute_dtype,
                       attention_impl=attention_impl, adaln=adaln, rngs=rngs)
              for _ in range(depth)]
    self.blocks = stack_blocks(blocks) if self.scan_layers else nnx.List(blocks)
    self.final = FinalLayer(hidden_size, self.out_features, dtype=compute_dtype, adaln=adaln,
                            rngs=rngs)
    # adaLN-single's shared projection (zero-init, like DiT's per-block ones).
    self.shared_adaln = (Linear(hidden_size, 6 * hidden_size, kernel_init=_zeros,
                                bias_init=_zeros, dtype=compute_dtype, rngs=rngs)
                         if adaln == "single" else None)
    self.compute_dtype = compute_dtype

  def forward_flops(self, *, per_token: bool = True) -> float:
    """Analytic FLOPs of one example's forward pass (2 per multiply-add; matmuls and attention).

    `per_token=True` counts the dense per-token conditioning (training's path: every token's
    adaLN rows), False one conditioning row per example (DiT with scalar levels). Normalisation,
    activations and softmax are left out, as in DiT's and the usual MFU counts.
    """
    n, d, h = self.num_tokens, self.hidden_size, self.mlp_hidden
    rows = n if per_token else 1
    single = self.adaln == "single"
    block = n * (4 * d * d + 2 * d * h) + 2 * n * n * d + (0 if single else rows * 6 * d * d)
    embed = n * self.patch_embed.in_features * d
    embed += rows * (self.level_embed.frequency_dim * d + d * d)
    embed += (self.num_classes + 1) * d if self.num_classes else 0
    embed += rows * 6 * d * d if single else 0
    final = (0 if single else rows * 2 * d * d) + n * d * self.out_features
    return 2.0 * (self.depth * block + embed + final)

  def train_flops(self, batch_size: int) -> float:
    """Analytic FLOPs of a train step on `batch_size` examples: forward + backward ≈ 3 forwards
    (per-token conditioning; rematerialised recomputation not counted, as MFU defines it)."""
    return 3.0 * batch_size * self.forward_flops(per_token=True)

  # The three ways to build the conditioning; all give SiLU(emb(t_i) + emb(y)) per token.
  def scalar_conditioning(self, t: Array, y: Array | None) -> Conditioning:
    """`t: [B]` (one level per example): one row, broadcast over tokens (exactly DiT)."""
    c = self.level_embed(t)[:, None]
    return Conditioning(nnx.silu(c if y is None else c + y))

  def dense_conditioning(self, t_tokens: Array, y: Array | None) -> Conditioning:
    """`t_tokens: [B, N]`: one row per token (the naive per-token adaLN)."""
    c = self.level_embed(t_tokens)
    return Conditioning(nnx.silu(c if y is None else c + y))

  def slot_conditioning(self, slots: LevelSlots, y: Array | None) -> Conditioning:
    """One row per distinct level (K slots); exact only if every example fits (`slots.fits`)."""
    c = self.level_embed(slots.values)
    return Conditioning(nnx.silu(c if y is None else c + y), slots.index)

  def token_levels(self, t: Array) -> Array:
    """The level map `[B, *spatial/p_l]` → per DiT token `[B, N]`."""
    t = common.repeat_spatial(t, self.level_patch_size // self.patch_size, len(self.grid))
    return t.reshape(t.shape[0], self.num_tokens)

  def shared_modulation(self, cond: Conditioning) -> Conditioning:
    """adaLN-single: adds the shared projection's six modulation chunks (once for all blocks);
    DiT's adaLN: `cond` unchanged."""
    if self.shared_adaln is None:
      return cond
    shared = cond.per_token(self.shared_adaln(cond.rows))
    return cond._replace(shared=tuple(jnp.split(shared, 6, axis=-1)))

  def forward_tokens(self, z: Array, cond: Conditioning) -> Array:
    """The transformer on patchified `z` under a given conditioning → `[B, N, p^n C_out]`."""
    x = self.patch_embed(patchify(z.astype(self.compute_dtype), self.patch_size))
    pos = sincos_position_embedding(self.grid, self.hidden_size)
    x = x + jnp.asarray(pos, x.dtype)
    cond = self.shared_modulation(cond)
    if self.scan_layers:
      body = common.rematerialised(_run_block, self.remat, prevent_cse=False)
      x = nnx.scan(body, in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)(self.blocks, x, cond)
    else:
      body = common.rematerialised(_run_block, self.remat)
      for block in self.blocks:
        x = body(block, x, cond)
    return self.final(x, cond)

  def __call__(self, z: Array, t: Array, labels: Array | None = None, *,
               deterministic: bool = True) -> common.ModelOutput:
    """Predicts the output (and log-variance) for `z: [B, *spatial, C]` at levels `t`.

    With `deterministic=True` and a level map, the cheapest exact path runs (`choose_path`):
    the scalar-level DiT if every example is homogeneous, the slot path if every example has at
    most `level_slots` distinct levels, else the dense path (one `lax.switch` for the batch;
    under `vmap` the switch is batched and every path runs). Training uses the dense path.
    """
    common.check_data(z, self.data_shape, "DiT")
    batch = z.shape[0]
    t = common.check_level_map(t, batch, self.level_grid, self.level_patch_size, "DiT")
    labels = common.check_labels(labels, batch, self.num_classes, "DiT")
    y = None if self.class_embed is None else self.class_embed(labels)[:, None]
    if t.ndim == 1:
      out = self.forward_tokens(z, self.scalar_conditioning(t, y))
    else:
      t_tokens = self.token_levels(t)
      out = self._per_token(z, t_tokens, y, deterministic)
    out = unpatchify(out, self.grid, self.patch_size)
    return common.split_head(out, t, channels=self.channels, uncertainty=self.uncertainty,
                             schedule=self.schedule, parametrization=self.parametrization,
                             data_shape=self.data_shape, level_patch=self.level_patch_size)

  def _per_token(self, z: Array, t_tokens: Array, y: Array | None,
                 deterministic: bool) -> Array:
    dense = lambda: self.forward_tokens(z, self.dense_conditioning(t_tokens, y))
    # Training maps are almost never few-valued: training skips the switch (and its compile).
    if not deterministic or self.level_slots == 0:
      return dense()
    slots = find_level_slots(t_tokens, min(self.level_slots, self.num_tokens))
    sparse = lambda: self.forward_tokens(z, self.slot_conditioning(slots, y))
    return choose_path(
        slots,
        homogeneous=lambda: self.forward_tokens(
            z, self.scalar_conditioning(slots.values[:, 0], y)),
        sparse=sparse if self.level_slots < self.num_tokens else None,  # else no cheaper
        dense=dense)
