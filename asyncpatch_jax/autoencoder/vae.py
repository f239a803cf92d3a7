"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX.

The module tree mirrors diffusers' attribute names (`encoder.down_blocks[0].resnets[0].conv1`,
`decoder.mid_block.attentions[0].to_q`, …) so that `weights.py` maps the public safetensors files
(`stabilityai/sd-vae-ft-ema`, `stabilityai/sd-vae-ft-mse`) onto it key by key. Images are NHWC in
[-1, 1]; latents are `[B, H/8, W/8, 4]`.

Latent diffusion trains on *scaled* latents, `scaling_factor · z` (0.18215 for the SD VAE, which
makes their standard deviation ≈ 1 on natural images); `encode_scaled` / `decode_scaled` apply and
undo the factor, `encode` / `decode` work on the VAE's own latent scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

Array = jax.Array

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture; the defaults are the SD VAE (`sd-vae-ft-ema` / `sd-vae-ft-mse`)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  latent_channels: int = 4
  mid_block_attention: bool = True
  scaling_factor: float = 0.18215

  @classmethod
  def tiny(cls, **overrides: Any) -> VAEConfig:
    """An ≈80K-parameter VAE with the same structure (factor 8), for tests and debug runs."""
    fields = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    fields.update(overrides)
    return cls(**fields)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """`[h, w, c]` of the latent of a square `image_size` image."""
    f = self.downsample_factor
    if image_size % f:
      raise ValueError(f"image size {image_size} is not divisible by the VAE's factor {f}")
    return (image_size // f, image_size // f, self.latent_channels)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


SD_VAE = VAEConfig()  # stabilityai/sd-vae-ft-ema and sd-vae-ft-mse
VAE_CONFIGS = {"sd": SD_VAE, "tiny": VAEConfig.tiny()}  # by name, as configs choose them


def vae_config(name: str, scaling_factor: float | None = None) -> VAEConfig:
  """`VAE_CONFIGS[name]`, with `scaling_factor` replaced when given."""
  if name not in VAE_CONFIGS:
    raise ValueError(f"unknown VAE config {name!r}; choose one of {sorted(VAE_CONFIGS)}")
  config = VAE_CONFIGS[name]
  if scaling_factor is not None:
    config = dataclasses.replace(config, scaling_factor=float(scaling_factor))
  return config


@struct.dataclass
class LatentDistribution:
  """The encoder's diagonal Gaussian posterior q(z | x) on the VAE's own (unscaled) latent scale."""

  mean: Array
  logvar: Array

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: Array) -> Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL(q ‖ N(0, I)) per example, summed over latent elements."""
    kl = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1)


class ResnetBlock2D(nnx.Module):
  """[GroupNorm, SiLU, conv3×3] × 2 plus a (1×1-conv when the width changes) shortcut."""

  def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, *, dtype: Any,
               rngs: nnx.Rngs):
    g, eps = config.norm_num_groups, config.norm_eps
    norm = dict(num_groups=g, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)
    self.norm1 = nnx.GroupNorm(in_channels, **norm)
    self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), padding=1, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_channels, **norm)
    self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), padding=1, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (nnx.Conv(in_channels, out_channels, (1, 1), dtype=dtype, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: Array) -> Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class AttentionBlock(nnx.Module):
  """Single-head self-attention over all positions, with a pre-GroupNorm and a residual."""

  def __init__(self, channels: int, config: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
    self.group_norm = nnx.GroupNorm(channels, num_groups=config.norm_num_groups,
                                    epsilon=config.norm_eps, use_fast_variance=False,
                                    dtype=dtype, rngs=rngs)
    self.to_q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
    self.to_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)  # diffusers' to_out.0

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """resnet → (attention) → resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

  def __init__(self, channels: int, config: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, config, dtype=dtype, rngs=rngs)
                             for _ in range(2)])
    self.attentions = nnx.List(
        [AttentionBlock(channels, config, dtype=dtype, rngs=rngs)]
        if config.mid_block_attention else [])

  def __call__(self, x: Array) -> Array:
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3×3 conv after padding one row/column at the bottom/right (diffusers' padding=0)."""

  def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                         dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour ×2, then a 3×3 conv."""

  def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class DownBlock(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, add_downsample: bool,
               *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config, dtype=dtype,
                      rngs=rngs) for i in range(config.layers_per_block)])
    self.downsamplers = nnx.List(
        [Downsample(out_channels, dtype=dtype, rngs=rngs)] if add_downsample else [])

  def __call__(self, x: Array) -> Array:
    for resnet in self.resnets:
      x = resnet(x)
    for down in self.downsamplers:
      x = down(x)
    return x


class UpBlock(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, add_upsample: bool,
               *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config, dtype=dtype,
                      rngs=rngs) for i in range(config.layers_per_block + 1)])
    self.upsamplers = nnx.List(
        [Upsample(out_channels, dtype=dtype, rngs=rngs)] if add_upsample else [])

  def __call__(self, x: Array) -> Array:
    for resnet in self.resnets:
      x = resnet(x)
    for up in self.upsamplers:
      x = up(x)
    return x


def _out_norm(channels: int, config: VAEConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=config.norm_num_groups, epsilon=config.norm_eps,
                       use_fast_variance=False, dtype=dtype, rngs=rngs)


class Encoder(nnx.Module):
  """Image `[B, H, W, 3]` → posterior moments `[B, H/f, W/f, 2·latent_channels]`."""

  def __init__(self, config: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
    chans = config.block_out_channels
    self.conv_in = nnx.Conv(config.in_channels, chans[0], (3, 3), padding=1, dtype=dtype,
                            rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock(chans[max(i - 1, 0)], chans[i], config, i < len(chans) - 1, dtype=dtype,
                  rngs=rngs) for i in range(len(chans))])
    self.mid_block = MidBlock(chans[-1], config, dtype=dtype, rngs=rngs)
    self.conv_norm_out = _out_norm(chans[-1], config, dtype, rngs)
    self.conv_out = nnx.Conv(chans[-1], 2 * config.latent_channels, (3, 3), padding=1,
                             dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent `[B, h, w, latent_channels]` → image `[B, h·f, w·f, 3]`."""

  def __init__(self, config: VAEConfig, *, dtype: Any, rngs: nnx.Rngs):
    chans = tuple(reversed(config.block_out_channels))
    self.conv_in = nnx.Conv(config.latent_channels, chans[0], (3, 3), padding=1, dtype=dtype,
                            rngs=rngs)
    self.mid_block = MidBlock(chans[0], config, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(chans[max(i - 1, 0)], chans[i], config, i < len(chans) - 1, dtype=dtype,
                rngs=rngs) for i in range(len(chans))])
    self.conv_norm_out = _out_norm(chans[-1], config, dtype, rngs)
    self.conv_out = nnx.Conv(chans[-1], config.out_channels, (3, 3), padding=1, dtype=dtype,
                             rngs=rngs)

  def __call__(self, z: Array) -> Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The SD VAE: `encode` → `LatentDistribution`, `decode` latents → images in [-1, 1].

  `dtype` is the computation dtype (e.g. bfloat16 on accelerators); parameters stay float32 and
  the posterior moments are returned in float32.
  """

  def __init__(self, config: VAEConfig = SD_VAE, *, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    c = config.latent_channels
    self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
    self.quant_conv = nnx.Conv(2 * c, 2 * c, (1, 1), dtype=dtype, rngs=rngs)
    self.post_quant_conv = nnx.Conv(c, c, (1, 1), dtype=dtype, rngs=rngs)
    self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

  def encode(self, images: Array) -> LatentDistribution:
    """Images `[B, H, W, in_channels]` in [-1, 1] → q(z | x) on the unscaled latent scale."""
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"expected images [B, H, W, {self.config.in_channels}], got "
                       f"{images.shape}")
    f = self.config.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by the VAE's factor {f}")
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return LatentDistribution(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  def decode(self, z: Array) -> Array:
    """Unscaled latents `[B, h, w, latent_channels]` → images (≈ [-1, 1], not clipped)."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"expected latents [B, h, w, {self.config.latent_channels}], got "
                       f"{z.shape}")
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def encode_scaled(self, images: Array, rng: Array | None = None) -> Array:
    """`scaling_factor · z`, z a posterior sample (with `rng`) or the posterior mean (without)."""
    dist = self.encode(images)
    z = dist.mode() if rng is None else dist.sample(rng)
    return z * self.config.scaling_factor

  def decode_scaled(self, latents: Array) -> Array:
    """The inverse of `encode_scaled`: scaled latents → images."""
    return self.decode(latents / self.config.scaling_factor)

  def __call__(self, images: Array, rng: Array | None = None) -> Array:
    """Reconstruction `decode(z)`, z sampled with `rng` or the posterior mean."""
    dist = self.encode(images)
    return self.decode(dist.mode() if rng is None else dist.sample(rng))


def abstract_vae(config: VAEConfig = SD_VAE, *, dtype: Any = jnp.float32) -> AutoencoderKL:
  """The VAE with `jax.ShapeDtypeStruct` leaves (no memory allocated), for shapes and counts."""
  return nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))


def init_vae(config: VAEConfig = SD_VAE, *, seed: int = 0, dtype: Any = jnp.float32
             ) -> AutoencoderKL:
  """A randomly initialised VAE for tests and debug runs, deterministic in `seed`.

  Weights are drawn with NumPy (fan-in-scaled normal kernels, zero biases, unit GroupNorm
  scales) instead of the modules' JAX initialisers, whose ~200 random draws take tens of
  seconds to compile on a CPU; such a VAE only exercises the plumbing, never trains.
  """
  graphdef, state = nnx.split(abstract_vae(config, dtype=dtype))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape = tuple(var.shape)
    if path[-1] == "kernel":
      value = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(math.prod(shape[:-1]))
    elif path[-1] == "scale":
      value = np.ones(shape, np.float32)
    else:
      value = np.zeros(shape, np.float32)
    var.set_value(jnp.asarray(value, var.dtype))
  return nnx.merge(graphdef, flat.to_nested_state())


def num_params(model: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_paths(model: nnx.Module) -> Sequence[tuple[Any, ...]]:
  """Every parameter's path in the module tree, e.g. `('encoder', 'conv_in', 'kernel')`."""
  return [tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
