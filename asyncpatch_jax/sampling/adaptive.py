"""Uncertainty-guided acceleration: the predicted variance decides how far each token moves.

`BudgetPlan` ('budget', the default rule) spends exactly the N steps it is given: the least
certain tokens keep the uniform pace, more certain ones run ahead (its docstring; measurements in
README, "Acceleration"). The two older rules below stop when the last token is clean; measured at
equal NFE on the exact Gaussian denoiser they are worse than a uniform plan
(`results/acceleration_gaussian.json`), and they stay for the claims reproduction.

The rules compare a token's predicted uncertainty v_i (the predicted squared error of x̂0,
averaged over the token) with the reference v_ref(t) = d / (1 + d·SNR(t)): the posterior
variance an element of variance d would have at level t from its own noisy value alone. The
certainty ratio r_i = v_ref(t_i) / v_i ≥ 1 says how much the rest of the image (known context,
tokens already clean) has told about token i beyond its own observation: a token with r_i = 4
is as well determined as a lone token at a much lower level, so it can take a larger step.
For the two older rules the loop stops as soon as every token is clean, so `info['nfe']` counts
the steps taken.

- `StepSizePlan` ('step_size', per-token adaptive step size): token i moves
  Δt_i = min(max(r_i, 1)^γ, max_speedup) / M per step (M = `num_steps`). At most M steps;
  fewer when context makes tokens certain. Measured with the exact Gaussian denoiser (8
  correlated elements, every other one known, 4000 samples): M = 100 takes 60 calls for a KL
  of 0.015 to the exact conditional, where a uniform plan with 60 steps gives 0.022 (M = 50: 30
  calls, 0.043 against 0.056).
- `QuantilePlan` ('quantile', dual-speed): per example, the ⌈q·n⌉ most certain (largest r) of
  the n noisy tokens move `speedup` ticks of 1/M, the rest one tick: a fixed reallocation
  where easy regions run ahead and become context for hard ones (Patch Forcing's "fast and
  slow"). The loop runs until the last token is clean, so its length is set by the token that
  is least often on the fast loop: between ⌈M/speedup⌉ and M steps. A token needs M − k·(s − 1)
  steps if it is fast in k of them (s = speedup); M / (1 + q·(s − 1)) is only the average over
  tokens, reached when the fast set rotates evenly. It never does fully: on the Gaussian above
  (tokens alike, ranks rotate) M = 40, q = 0.5, s = 2 takes 29–31 steps (26.7 would be even
  rotation); on images, where the hardest regions stay the least certain until the noisy tokens
  thin out (⌈q·n⌉ ≥ 1 keeps the last ones fast), it stays close to M. On that Gaussian it is no
  better than a uniform plan of the same length (72 calls: KL 0.018 against 0.015); it is meant
  for images, whose regions differ in difficulty.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import Schedule
from asyncpatch_jax.sampling.plans import Plan, _check_steps

Array = jax.Array
ADAPTIVE_RULES = ("budget", "step_size", "quantile")
REFERENCES = ("first", "data")


def certainty_ratio(token_variance: Array, levels: Array, schedule: Schedule,
                    data_variance: float | Array = 1.0) -> Array:
  """r = v_ref(t) / v with v_ref(t) = d / (1 + d·SNR(t)) (see the module docstring); d is a
  scalar or per token (broadcasting to `levels`)."""
  snr = jnp.exp(schedule.log_snr(levels))
  reference = data_variance / (1.0 + data_variance * snr)
  return reference / jnp.maximum(token_variance, 1e-30)


def _check_common(num_steps: int, data_variance: float) -> None:
  _check_steps("num_steps", num_steps)
  if not data_variance > 0:
    raise ValueError(f"data_variance must be positive, got {data_variance}")


@dataclasses.dataclass(frozen=True, eq=False)
class StepSizePlan(Plan):
  """The per-token adaptive step size Δt_i = min(max(r_i, 1)^γ, max_speedup) / M.

  Attributes:
    num_steps: M, the steps of a token that context does not help (the loop bound).
    schedule: the noise schedule (levels → SNR).
    exponent: γ; 0 is the uniform plan, 1 moves in proportion to the certainty ratio.
    max_speedup: the largest step, in units of 1/M.
    data_variance: d, the per-element variance of the data (≈ 0.25 for images in [−1, 1]).
  """

  num_steps: int
  schedule: Schedule
  exponent: float = 1.0
  max_speedup: float = 8.0
  data_variance: float = 1.0
  needs_variance = True

  def __post_init__(self):
    _check_common(self.num_steps, self.data_variance)
    if self.exponent < 0 or self.max_speedup < 1:
      raise ValueError(f"need exponent >= 0 and max_speedup >= 1, got {self.exponent}, "
                       f"{self.max_speedup}")

  @property
  def max_steps(self) -> int:  # type: ignore[override]
    return self.num_steps

  def next_levels(self, step, levels, token_variance, known_mask, state):
    del step, known_mask
    ratio = certainty_ratio(token_variance, levels, self.schedule, self.data_variance)
    speed = jnp.minimum(jnp.maximum(ratio, 1.0) ** self.exponent, self.max_speedup)
    nxt = levels - speed / self.num_steps
    return jnp.where(nxt < 1e-6, 0.0, nxt), state  # no step wasted on round-off


@dataclasses.dataclass(frozen=True, eq=False)
class QuantilePlan(Plan):
  """The dual-speed quantile rule: the most certain `quantile` of noisy tokens move faster.

  Levels stay on the grid k/M, so every noisy token moves at least one tick a step and the loop
  takes at most M steps. Ties in certainty go to the lower row-major index.

  Attributes:
    num_steps: M.
    schedule: the noise schedule.
    quantile: q, the fraction of each example's noisy tokens on the fast loop.
    speedup: ticks per step on the fast loop (an integer ≥ 1).
    data_variance: d, as for `StepSizePlan`.
  """

  num_steps: int
  schedule: Schedule
  quantile: float = 0.5
  speedup: int = 2
  data_variance: float = 1.0
  needs_variance = True

  def __post_init__(self):
    _check_common(self.num_steps, self.data_variance)
    _check_steps("speedup", self.speedup)
    if not 0.0 <= self.quantile <= 1.0:
      raise ValueError(f"quantile must lie in [0, 1], got {self.quantile}")

  @property
  def max_steps(self) -> int:  # type: ignore[override]
    return self.num_steps

  def next_levels(self, step, levels, token_variance, known_mask, state):
    del step, known_mask
    active = levels > 0
    ratio = certainty_ratio(token_variance, levels, self.schedule, self.data_variance)
    batch = levels.shape[0]
    key = jnp.where(active, -ratio, jnp.inf).reshape(batch, -1)
    rank = jnp.argsort(jnp.argsort(key, axis=1, stable=True), axis=1, stable=True)
    n_fast = jnp.ceil(self.quantile * active.reshape(batch, -1).sum(axis=1))
    fast = active & (rank < n_fast[:, None]).reshape(levels.shape)
    ticks = jnp.round(levels * self.num_steps) - jnp.where(fast, self.speedup, 1)
    return jnp.maximum(ticks, 0.0) / self.num_steps, state


@dataclasses.dataclass(frozen=True, eq=False)
class BudgetPlan(Plan):
  """The fixed-budget uncertainty-guided plan: every token is clean after exactly N steps.

  With R = N − m steps left, a token at level t_i steps to t_i·(1 − s_i/R), clipped at 0:
  s_i = 1 walks it linearly to 0 at step N (the uniform plan's pace, kept by the least certain
  tokens), and the speed-up s_i = min(max(r_i / r̄, 1)^γ, max_speedup) lets tokens that the
  rest of the image determines better than it does the typical token run ahead and become
  clean context sooner; r̄ is the geometric mean of r over the example's noisy tokens (with
  `relative=False`, r̄ = 1). r_i is the certainty ratio against a per-token reference d_i (see
  `certainty_ratio`): 'first' takes the head's own prediction at the first step, where every
  unknown token is at level 1 (the variance given the known context alone), 'data' a given
  per-position data variance. The loop length, and so the NFE, is N regardless of the data.

  Measured on the exact Gaussian denoiser (benchmarks/acceleration.py): with r̄ = 1 the
  tokens of a homogeneous field all run ahead together, which is only a worse time grid than
  the uniform one (covariance error 0.27 against 0.23 at N = 8); the relative ratio only moves
  tokens that differ from the rest.

  Attributes:
    num_steps: N, the budget of steps (denoiser evaluations).
    schedule: the noise schedule (levels → SNR).
    exponent: γ; 0 is the uniform plan.
    max_speedup: the largest s_i.
    reference: 'first' or 'data'.
    relative: compare r_i with the example's typical noisy token (True) or with 1.
    data_variance: d_i for reference='data': a scalar or an array broadcasting to the token
      grid `[*grid]` (per-position variance of the data, averaged over each token).
  """

  num_steps: int
  schedule: Schedule
  exponent: float = 1.0
  max_speedup: float = 4.0
  reference: str = "first"
  data_variance: float | Any = 1.0
  relative: bool = True
  needs_variance = True

  def __post_init__(self):
    _check_steps("num_steps", self.num_steps)
    if self.exponent < 0 or self.max_speedup < 1:
      raise ValueError(f"need exponent >= 0 and max_speedup >= 1, got {self.exponent}, "
                       f"{self.max_speedup}")
    if self.reference not in REFERENCES:
      raise ValueError(f"unknown certainty reference {self.reference!r}; choose one of "
                       f"{REFERENCES}")
    d = np.asarray(self.data_variance, np.float64)
    if not np.all(d > 0):
      raise ValueError("data_variance must be positive (per position)")

  @property
  def max_steps(self) -> int:  # type: ignore[override]
    return self.num_steps

  def init(self, known_mask):
    return jnp.ones(known_mask.shape, jnp.float32)

  def next_levels(self, step, levels, token_variance, known_mask, state):
    del known_mask
    if self.reference == "first":
      reference = jnp.where(step == 0, jnp.maximum(token_variance, 1e-30), state)
    else:
      reference = jnp.broadcast_to(jnp.asarray(self.data_variance, jnp.float32), levels.shape)
    ratio = certainty_ratio(token_variance, levels, self.schedule, reference)
    if self.relative:
      active = levels > 0
      axes = tuple(range(1, levels.ndim))
      log_ratio = jnp.where(active, jnp.log(jnp.maximum(ratio, 1e-30)), 0.0)
      typical = log_ratio.sum(axes, keepdims=True) / jnp.maximum(active.sum(axes, keepdims=True), 1)
      ratio = ratio * jnp.exp(-typical)
    speed = jnp.minimum(jnp.maximum(ratio, 1.0) ** self.exponent, self.max_speedup)
    remaining = (self.num_steps - step).astype(jnp.float32)
    nxt = levels * (1.0 - speed / remaining)
    return jnp.where(nxt < 1e-6, 0.0, nxt), reference


def make_adaptive_plan(rule: str, num_steps: int, schedule: Schedule, **kwargs) -> Plan:
  """The named rule's plan; `kwargs` are the rule's own (`BudgetPlan`, `StepSizePlan`,
  `QuantilePlan`)."""
  if rule == "budget":
    return BudgetPlan(num_steps, schedule, **kwargs)
  if rule == "step_size":
    return StepSizePlan(num_steps, schedule, **kwargs)
  if rule == "quantile":
    return QuantilePlan(num_steps, schedule, **kwargs)
  raise ValueError(f"unknown adaptive rule {rule!r}; choose one of {ADAPTIVE_RULES}")
