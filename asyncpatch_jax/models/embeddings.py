"""Level and class embeddings, and label dropout for classifier-free guidance.

A token's level `t ∈ [0, 1]` (or its log-SNR λ(t)) becomes a sinusoidal feature vector and then
an MLP output (DiT's `TimestepEmbedder`); applied per token, the MLP is a stack of 1×1
convolutions over the level map. The scalar fed to the sinusoid (`level_feature`) is `1000 t`,
λ(t) mapped affinely onto [0, 1000], or ('dit') the timestep of the official DiT's discrete
schedule with the same log-SNR, so that DiT's pretrained timestep embedder is reused unchanged.
The class table has `num_classes + 1` rows: the last one is the null class used for
unconditional predictions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asyncpatch_jax.diffusion.schedules import Schedule
from asyncpatch_jax.models.precision import Linear

Array = jax.Array
LEVEL_EMBEDDINGS = ("t", "log_snr", "dit")
SCHEDULE_EMBEDDINGS = ("log_snr", "dit")  # the kinds that read λ(t), so need the schedule
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


# The official DiT (facebookresearch/DiT, diffusion/gaussian_diffusion.py): 1000 discrete steps,
# β linear from 1e-4 to 0.02 (float64), ᾱ_n = Π_{m ≤ n} (1 − β_m), timestep n = 0 … 999.
DIT_NUM_TIMESTEPS = 1000
DIT_BETA_RANGE = (1e-4, 0.02)


def dit_log_snr() -> np.ndarray:
  """λ_n = log(ᾱ_n / (1 − ᾱ_n)) of DiT's timesteps n = 0 … 999 (float64, decreasing): from
  +9.21 at n = 0 to −10.11 at n = 999."""
  betas = np.linspace(*DIT_BETA_RANGE, DIT_NUM_TIMESTEPS, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)


def dit_timestep(log_snr: Array) -> Array:
  """The continuous DiT timestep of log-SNR λ, elementwise: λ_n interpolated linearly between
  the integer timesteps (exact at them), clamped to DiT's trained range [0, 999]. A level less
  noisy than DiT's first step (λ > 9.21) reads as timestep 0, a noisier one than its last
  (λ < −10.11) as 999: the pretrained embedder saw nothing beyond them."""
  table = dit_log_snr()[::-1]  # increasing, as jnp.interp wants; it clamps outside the table
  steps = np.arange(DIT_NUM_TIMESTEPS - 1, -1, -1, dtype=np.float64)
  return jnp.interp(jnp.asarray(log_snr, jnp.float32), jnp.asarray(table, jnp.float32),
                    jnp.asarray(steps, jnp.float32))


def level_feature(t: Array, kind: str, schedule: Schedule | None) -> Array:
  """The scalar fed to the sinusoid: `1000 t`; λ(t) mapped from LOG_SNR_RANGE to [0, 1000]; or
  ('dit') the DiT timestep of λ(t) (`dit_timestep`)."""
  if kind == "t":
    return 1000.0 * jnp.asarray(t, jnp.float32)
  if kind not in LEVEL_EMBEDDINGS:
    raise ValueError(f"unknown level_embedding {kind!r}; choose one of {LEVEL_EMBEDDINGS}")
  if schedule is None:
    raise ValueError(f"level_embedding={kind!r} needs the noise schedule")
  if kind == "dit":
    return dit_timestep(schedule.log_snr(t))
  lo, hi = LOG_SNR_RANGE
  return 1000.0 * (hi - schedule.log_snr(t)) / (hi - lo)


class LevelEmbedding(nnx.Module):
  """Per-token level embedding: sinusoid(t or λ) → Linear → SiLU → Linear, on any shape of `t`."""

  def __init__(self, features: int, *, kind: str = "t", schedule: Schedule | None = None,
               frequency_dim: int = 256, dtype=jnp.float32, init_std: float | None = None,
               rngs: nnx.Rngs):
    if kind not in LEVEL_EMBEDDINGS:
      raise ValueError(f"unknown level_embedding {kind!r}; choose one of {LEVEL_EMBEDDINGS}")
    if kind in SCHEDULE_EMBEDDINGS and schedule is None:
      raise ValueError(f"level_embedding={kind!r} needs the noise schedule")
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
