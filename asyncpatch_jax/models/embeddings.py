"""Level and class embeddings, and label dropout for classifier-free guidance.

A token's level `t ∈ [0, 1]` (or its log-SNR λ(t)) becomes a sinusoidal feature vector and then
an MLP output (DiT's `TimestepEmbedder`); applied per token, the MLP is a stack of 1×1
convolutions over the level map. The class table has `num_classes + 1` rows: the last one is the
null class used for unconditional predictions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from asyncpatch_jax.diffusion.schedules import Schedule
from asyncpatch_jax.models.precision import Linear

Array = jax.Array
LEVEL_EMBEDDINGS = ("t", "log_snr")
# λ is mapped affinely from this range onto [0, 1000] (the DDPM timestep range the sinusoid's
# frequencies are tuned for). The range is fixed, not the schedule's own bounds, so a model
# conditioned on λ sees the same feature for the same SNR under any schedule.
LOG_SNR_RANGE = (-20.0, 20.0)


def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """`[..., dim]` features [cos(x ω_k), sin(x ω_k)], ω_k = max_period^(−k/(dim/2)) (as DiT)."""
  if dim % 2:
    raise ValueError(f"sinusoidal embedding dimension must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(x, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def level_feature(t: Array, kind: str, schedule: Schedule | None) -> Array:
  """The scalar fed to the sinusoid: `1000 t`, or λ(t) mapped from LOG_SNR_RANGE to [0, 1000]."""
  if kind == "t":
    return 1000.0 * jnp.asarray(t, jnp.float32)
  if kind == "log_snr":
    if schedule is None:
      raise ValueError("level_embedding='log_snr' needs the noise schedule")
    lo, hi = LOG_SNR_RANGE
    return 1000.0 * (hi - schedule.log_snr(t)) / (hi - lo)
  raise ValueError(f"unknown level_embedding {kind!r}; choose one of {LEVEL_EMBEDDINGS}")


class LevelEmbedding(nnx.Module):
  """Per-token level embedding: sinusoid(t or λ) → Linear → SiLU → Linear, on any shape of `t`."""

  def __init__(self, features: int, *, kind: str = "t", schedule: Schedule | None = None,
               frequency_dim: int = 256, dtype=jnp.float32, init_std: float | None = None,
               rngs: nnx.Rngs):
    if kind not in LEVEL_EMBEDDINGS:
      raise ValueError(f"unknown level_embedding {kind!r}; choose one of {LEVEL_EMBEDDINGS}")
    if kind == "log_snr" and schedule is None:
      raise ValueError("level_embedding='log_snr' needs the noise schedule")
    self.kind = kind
    self.schedule = schedule
    self.frequency_dim = frequency_dim
    init = (nnx.initializers.lecun_normal() if init_std is None
            else nnx.initializers.normal(init_std))
    self.fc1 = Linear(frequency_dim, features, kernel_init=init, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(features, features, kernel_init=init, dtype=dtype, rngs=rngs)

  def __call__(self, t: Array) -> Array:
    h = sinusoidal_embedding(level_feature(t, self.kind, self.schedule), self.frequency_dim)
    return self.fc2(nnx.silu(self.fc1(h)))


class ClassEmbedding(nnx.Module):
  """A `num_classes + 1`-row table; row `num_classes` is the null (unconditional) class.

  The lookup is a one-hot matmul (B × (num_classes + 1) × d MACs, negligible next to the network):
  unlike a gather, its sharding is unambiguous under explicit-sharding meshes.
  """

  def __init__(self, num_classes: int, features: int, *, dtype=jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f"ClassEmbedding needs num_classes >= 1, got {num_classes}")
    self.num_classes = num_classes
    self.dtype = dtype
    self.embedding = nnx.Param(
        nnx.initializers.normal(init_std)(rngs.params(), (num_classes + 1, features)))

  def __call__(self, labels: Array) -> Array:
    one_hot = jax.nn.one_hot(labels, self.num_classes + 1, dtype=self.dtype)
    return one_hot @ self.embedding[...].astype(self.dtype)


def drop_labels(rng: Array, labels: Array, p: float, num_classes: int) -> Array:
  """Replaces each label by the null class `num_classes` with probability `p` (CFG training).

  Unconditional models (`num_classes == 0`) and `p == 0` return the labels unchanged.
  """
  if isinstance(p, int | float):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"label dropout probability must lie in [0, 1], got {p}")
    if p == 0.0:
      return labels
  if num_classes == 0:
    return labels
  drop = jax.random.bernoulli(rng, p, jnp.shape(labels))
  return jnp.where(drop, jnp.asarray(num_classes, jnp.asarray(labels).dtype), labels)
