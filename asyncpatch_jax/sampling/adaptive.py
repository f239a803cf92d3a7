"""Uncertainty-guided acceleration: the predicted variance decides how far each token moves.

`BudgetPlan` (rule 'budget', the one adaptive rule) spends exactly the N steps it is given: the
least certain tokens keep the uniform pace, more certain ones run ahead (its docstring;
measurements in README, "Acceleration").

The plan compares a token's predicted uncertainty v_i (the predicted squared error of x̂0,
averaged over the token) with the reference v_ref(t) = d / (1 + d·SNR(t)): the posterior
variance an element of variance d would have at level t from its own noisy value alone. The
certainty ratio r_i = v_ref(t_i) / v_i ≥ 1 says how much the rest of the image (known context,
tokens already clean) has told about token i beyond its own observation: a token with r_i = 4
is as well determined as a lone token at a much lower level, so it can take a larger step.

Issue 18 removed the two older rules, 'step_size' (Δt_i = min(max(r_i, 1)^γ, s_max) / M) and
'quantile' (the most certain fraction of tokens on a fast loop): both ran until the last token
was clean; on the exact Gaussian denoiser they were worse than a uniform plan of the same NFE in
7 of 8 measurements and worse than the budget plan with x0 draws in all 8 (README,
"Acceleration").
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
ADAPTIVE_RULES = ("budget",)
REMOVED_RULES = ("step_size", "quantile")  # issue 18: see the module docstring
REFERENCES = ("first", "data")


def certainty_ratio(token_variance: Array, levels: Array, schedule: Schedule,
                    data_variance: float | Array = 1.0) -> Array:
  """r = v_ref(t) / v with v_ref(t) = d / (1 + d·SNR(t)) (see the module docstring); d is a
  scalar or per token (broadcasting to `levels`)."""
  snr = jnp.exp(schedule.log_snr(levels))
  reference = data_variance / (1.0 + data_variance * snr)
  return reference / jnp.maximum(token_variance, 1e-30)


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


def check_rule(rule: str) -> None:
  """Raises ValueError for a rule that is not 'budget', naming the replacement of a removed one."""
  if rule in REMOVED_RULES:
    raise ValueError(f"the adaptive rule {rule!r} was removed (issue 18: at equal NFE it lost "
                     f"to the budget plan); use rule='budget' (adaptive.BudgetPlan, N steps "
                     f"exactly), the one adaptive rule")
  if rule not in ADAPTIVE_RULES:
    raise ValueError(f"unknown adaptive rule {rule!r}; choose one of {ADAPTIVE_RULES}")


def make_adaptive_plan(rule: str, num_steps: int, schedule: Schedule, **kwargs) -> Plan:
  """The named rule's plan ('budget': `BudgetPlan`; `kwargs` are its own)."""
  check_rule(rule)
  return BudgetPlan(num_steps, schedule, **kwargs)
