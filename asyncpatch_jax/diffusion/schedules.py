"""Variance-preserving noise schedules, parametrised by the log-SNR λ(t).

`t = 0` is clean data (λ = log_snr_max), `t = 1` is pure noise (λ = log_snr_min); λ decreases
strictly in between, so α² = sigmoid(λ) and σ² = sigmoid(−λ) with α² + σ² = 1. Every function is
elementwise, so a per-token level map goes through unchanged.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Schedule(abc.ABC):
  """A bounded, decreasing log-SNR schedule on t ∈ [0, 1]."""

  log_snr_min: float
  log_snr_max: float

  def __post_init__(self):
    if not (math.isfinite(self.log_snr_min) and math.isfinite(self.log_snr_max)):
      raise ValueError(
          f"schedule bounds must be finite, got log_snr_min={self.log_snr_min}, "
          f"log_snr_max={self.log_snr_max}")
    if not self.log_snr_min < self.log_snr_max:
      raise ValueError(
          f"log_snr_min ({self.log_snr_min}) must be below log_snr_max ({self.log_snr_max})")

  name: str = dataclasses.field(init=False, default="")

  @abc.abstractmethod
  def log_snr(self, t: Array) -> Array:
    """λ(t), elementwise."""

  @abc.abstractmethod
  def dlog_snr_dt(self, t: Array) -> Array:
    """dλ/dt (negative), elementwise, in closed form."""

  @abc.abstractmethod
  def t_from_log_snr(self, log_snr: Array) -> Array:
    """The inverse of `log_snr`."""

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    """(α(t), σ(t)) with α² = sigmoid(λ), σ² = sigmoid(−λ)."""
    lam = self.log_snr(t)
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

  def snr(self, t: Array) -> Array:
    return jnp.exp(self.log_snr(t))


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """The cosine schedule, α = cos(πt/2) up to truncation to [log_snr_min, log_snr_max].

  λ(t) = −2 log tan(θ(t)) with θ linear in t between the angles of the two bounds.
  """

  log_snr_min: float = -15.0
  log_snr_max: float = 15.0
  name: str = dataclasses.field(init=False, default="cosine")

  def _angles(self) -> tuple[float, float]:
    return (math.atan(math.exp(-0.5 * self.log_snr_max)),
            math.atan(math.exp(-0.5 * self.log_snr_min)))

  def log_snr(self, t: Array) -> Array:
    a, b = self._angles()
    return -2.0 * jnp.log(jnp.tan(a + jnp.asarray(t, jnp.float32) * (b - a)))

  def dlog_snr_dt(self, t: Array) -> Array:
    a, b = self._angles()
    theta = a + jnp.asarray(t, jnp.float32) * (b - a)
    return -4.0 * (b - a) / jnp.sin(2.0 * theta)

  def t_from_log_snr(self, log_snr: Array) -> Array:
    a, b = self._angles()
    return (jnp.arctan(jnp.exp(-0.5 * jnp.asarray(log_snr, jnp.float32))) - a) / (b - a)


@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
  """λ linear in t (VDM's fixed schedule): λ(t) = λ_max + t (λ_min − λ_max)."""

  log_snr_min: float = -10.0
  log_snr_max: float = 10.0
  name: str = dataclasses.field(init=False, default="linear")

  def log_snr(self, t: Array) -> Array:
    t = jnp.asarray(t, jnp.float32)
    return self.log_snr_max + t * (self.log_snr_min - self.log_snr_max)

  def dlog_snr_dt(self, t: Array) -> Array:
    return jnp.full(jnp.shape(t), self.log_snr_min - self.log_snr_max, jnp.float32)

  def t_from_log_snr(self, log_snr: Array) -> Array:
    log_snr = jnp.asarray(log_snr, jnp.float32)
    return (log_snr - self.log_snr_max) / (self.log_snr_min - self.log_snr_max)


SCHEDULES: dict[str, type[Schedule]] = {"cosine": CosineSchedule, "linear": LinearSchedule}


def get_schedule(name: str = "cosine", *, log_snr_min: float | None = None,
                 log_snr_max: float | None = None) -> Schedule:
  """Returns the named schedule; bounds default to the schedule's own."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule name {name!r}; choose one of {sorted(SCHEDULES)}")
  kwargs = {}
  if log_snr_min is not None:
    kwargs["log_snr_min"] = float(log_snr_min)
  if log_snr_max is not None:
    kwargs["log_snr_max"] = float(log_snr_max)
  return SCHEDULES[name](**kwargs)
