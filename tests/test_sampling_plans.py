"""Plans, update rules, input guidance and RePaint's schedule, piece by piece."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import Prediction, get_schedule
from asyncpatch_jax.sampling import (
    AutoregressivePlan,
    StaticPlan,
    analytic,
    autoregressive_levels,
    certainty_ratio,
    input_guided,
    repaint_nfe,
    repaint_times,
    sample,
    updates,
)
from asyncpatch_jax.sampling.plans import spiral_rank

SCHEDULE = get_schedule("cosine")
D = 8
DENOISER = analytic.GaussianDenoiser(np.linspace(-0.5, 0.5, D),
                                     analytic.smooth_covariance(D, 1.5, 0.05), SCHEDULE)
JIT_DENOISER = jax.jit(DENOISER)  # for direct calls outside a jitted sampler


def sample_jit(denoiser, rng, x_shape, **kwargs):
  """`sample` compiled as one program (run eagerly, its loop pieces dispatch one by one)."""
  return jax.jit(functools.partial(sample, denoiser, x_shape=x_shape, **kwargs))(rng)


def _levels(value, shape=(4, D)):
  return jnp.full(shape, value, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Update rules.


def test_ancestral_step_is_the_ddpm_posterior():
  """Against q(z_s | z_t, x0) written out in float64: α_{t|s} = α_t/α_s, σ²_{t|s} =
  σ_t² − α²_{t|s} σ_s², mean (α_{t|s} σ_s² z + α_s σ²_{t|s} x0)/σ_t², var σ²_{t|s} σ_s²/σ_t²."""
  rng = np.random.default_rng(0)
  t = rng.uniform(0.05, 1.0, (3, D))
  s = t * rng.uniform(0.05, 1.0, (3, D))
  z, x0, noise = (rng.standard_normal((3, D, 1)) for _ in range(3))
  out = updates.ancestral_step(jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32),
                               jnp.asarray(s, jnp.float32), jnp.asarray(x0, jnp.float32),
                               jnp.asarray(noise, jnp.float32), schedule=SCHEDULE)

  def alpha_sigma(level):
    lam = np.float64(np.asarray(SCHEDULE.log_snr(jnp.asarray(level, jnp.float32))))
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))

  (a_t, s_t), (a_s, s_s) = alpha_sigma(t[..., None]), alpha_sigma(s[..., None])
  a_ts = a_t / a_s
  var_ts = s_t**2 - a_ts**2 * s_s**2
  mean = (a_ts * s_s**2 * z + a_s * var_ts * x0) / s_t**2
  std = np.sqrt(var_ts * s_s**2 / s_t**2)
  np.testing.assert_allclose(np.asarray(out), mean + std * noise, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["ancestral", "ddim", "heun"])
def test_frozen_tokens_stay_and_finished_tokens_are_x0(rule):
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((2, D, 1)) * 3 + np.pi, jnp.float32)
  t = jnp.asarray(np.tile([0.9, 0.5, 0.3, 0.0, 0.7, 0.7, 1.0, 0.2], (2, 1)), jnp.float32)
  s = jnp.asarray(np.tile([0.9, 0.0, 0.3, 0.0, 0.0, 0.4, 1.0, 0.1], (2, 1)), jnp.float32)
  pred = JIT_DENOISER(z, t)
  if rule == "ancestral":
    out = updates.ancestral_step(z, t, s, pred.x0, jnp.ones_like(z), schedule=SCHEDULE)
  elif rule == "ddim":
    out = updates.ddim_step(z, t, s, pred.x0, schedule=SCHEDULE)
  else:
    out, calls, needed = updates.heun_step(
        z, t, s, pred, lambda z_, t_: (JIT_DENOISER(z_, t_), jnp.int32(1)), schedule=SCHEDULE)
    assert int(calls) == 1 and bool(np.all(needed))
  out, z, x0 = np.asarray(out)[..., 0], np.asarray(z)[..., 0], np.asarray(pred.x0)[..., 0]
  same = np.asarray(s == t)[0]
  np.testing.assert_array_equal(out[:, same], z[:, same])  # s = t: unchanged, bit-exact
  done = np.asarray((s == 0) & (t > 0))[0]
  np.testing.assert_array_equal(out[:, done], x0[:, done])  # s = 0: x̂0 exactly
  moving = ~same & ~done
  assert np.all(out[:, moving] != z[:, moving])


def test_ddim_is_exact_when_x0_is_known():
  """With the true x0 a DDIM step keeps the noise: z_t = α_t x0 + σ_t ε → α_s x0 + σ_s ε."""
  rng = np.random.default_rng(2)
  x0, eps = (jnp.asarray(rng.standard_normal((2, D, 1)), jnp.float32) for _ in range(2))
  t, s = _levels(0.8, (2, D)), jnp.asarray(rng.uniform(0.1, 0.8, (2, D)), jnp.float32)
  a_t, s_t = SCHEDULE.alpha_sigma(t[..., None])
  a_s, s_s = SCHEDULE.alpha_sigma(s[..., None])
  out = updates.ddim_step(a_t * x0 + s_t * eps, t, s, x0, schedule=SCHEDULE)
  np.testing.assert_allclose(np.asarray(out), np.asarray(a_s * x0 + s_s * eps), atol=2e-5)


def test_heun_is_second_order_and_ddim_first():
  """One step of size h against a 400-step solution of the same ODE: local errors scale as
  h² (DDIM, ratio ≈ 4 when h halves) and h³ (Heun, ratio ≈ 8); measured 3.8 and 8.1."""
  z = jax.random.normal(jax.random.key(0), (4, D, 1))
  call = lambda z_, t_: (DENOISER(z_, t_), jnp.int32(1))

  @jax.jit
  def ddim(z, t, s):
    return updates.ddim_step(z, _levels(t), _levels(s), DENOISER(z, _levels(t)).x0,
                             schedule=SCHEDULE)

  @jax.jit
  def heun(z, t, s):
    return updates.heun_step(z, _levels(t), _levels(s), DENOISER(z, _levels(t)), call,
                             schedule=SCHEDULE)[0]

  @jax.jit
  def reference(z, t, s):
    ts = jnp.linspace(t, s, 401)
    return jax.lax.fori_loop(0, 400, lambda i, z_: heun(z_, ts[i], ts[i + 1]), z)

  errors = {}
  for h in (0.2, 0.1):
    ref = reference(z, 0.7, 0.7 - h)
    errors[h] = (float(jnp.abs(ddim(z, 0.7, 0.7 - h) - ref).max()),
                 float(jnp.abs(heun(z, 0.7, 0.7 - h) - ref).max()))
  ddim_ratio, heun_ratio = (errors[0.2][i] / errors[0.1][i] for i in range(2))
  assert 3.0 < ddim_ratio < 5.0, errors
  assert 6.5 < heun_ratio < 10.0, errors
  assert errors[0.1][1] < errors[0.1][0] / 4


def test_heun_with_a_constant_x0_is_ddim_and_skips_its_corrector_at_the_end():
  rng = np.random.default_rng(3)
  z, x0 = (jnp.asarray(rng.standard_normal((2, D, 1)), jnp.float32) for _ in range(2))
  constant = lambda z_, t_: (Prediction(x0), jnp.int32(1))
  t, s = _levels(0.9, (2, D)), _levels(0.35, (2, D))
  out, calls, _ = updates.heun_step(z, t, s, Prediction(x0), constant, schedule=SCHEDULE)
  np.testing.assert_allclose(np.asarray(out), np.asarray(
      updates.ddim_step(z, t, s, x0, schedule=SCHEDULE)), atol=1e-5)
  assert int(calls) == 1
  out, calls, needed = updates.heun_step(z, t, jnp.zeros_like(t), Prediction(x0), constant,
                                         schedule=SCHEDULE)
  assert int(calls) == 0 and not np.any(needed)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x0))


# ------------------------------------------------------------------------------------------------
# Plans.


def _trajectory(plan_or_kwargs, x_shape=(1, D, 1), denoiser=None, **kwargs):
  denoiser = denoiser or (lambda z, t: Prediction(jnp.zeros_like(z), jnp.ones_like(z)))
  if isinstance(plan_or_kwargs, dict):
    kwargs = {**plan_or_kwargs, **kwargs}
  else:
    kwargs = {"strategy": plan_or_kwargs, **kwargs}
  _, info = sample_jit(denoiser, jax.random.key(0), x_shape, schedule=SCHEDULE,
                   return_levels=True, **kwargs)
  return np.asarray(info["levels"])[: int(info["num_steps"]) + 1]


@pytest.mark.parametrize("steps,overlap", [(3, 0.0), (4, 0.5), (3, 2 / 3), (2, 1.0)])
def test_autoregressive_plan_follows_the_method(steps, overlap):
  """t_k(m) = clip(1 − (m − o_k)/S, 0, 1), o_j = ⌊j·S·(1 − ρ)⌋, raster over single tokens."""
  levels = _trajectory(dict(strategy="autoregressive", steps_per_group=steps, overlap=overlap))
  m = np.arange(levels.shape[0])[:, None]
  offsets = np.floor(np.arange(D) * steps * (1 - overlap) + 1e-9)
  expected = np.clip(1 - (m - offsets[None]) / steps, 0, 1)
  assert levels.shape[0] == int(offsets[-1]) + steps + 1
  np.testing.assert_allclose(levels[:, 0], expected, atol=1e-6)
  np.testing.assert_allclose(levels[:, 0], autoregressive_levels(D, steps, overlap), atol=1e-6)


def test_autoregressive_groups_orders_and_known_groups():
  # 2-D grid 4 × 4 in 2 × 2 groups; spiral from the centre; a fully known group takes no slot.
  plan = AutoregressivePlan((4, 4), steps_per_group=2, order="raster", group_shape=2)
  assert plan.num_groups == 4 and plan.max_steps == 8
  known = np.zeros((1, 4, 4), bool)
  known[0, :2, :2] = True  # group 0
  levels = _trajectory(plan, x_shape=(1, 4, 4, 1), known=np.zeros((1, 4, 4, 1)),
                       known_mask=known)
  assert levels.shape[0] == 3 * 2 + 1
  np.testing.assert_array_equal(levels[:, 0, :2, :2], 0.0)
  first = levels[:, 0, :2, 2:]  # group 1 now takes slot 0
  np.testing.assert_allclose(first[:, 0, 0], [1.0, 0.5, 0.0, 0, 0, 0, 0])
  np.testing.assert_allclose(levels[:, 0, 2:, :2][:, 0, 0], [1, 1, 1, 0.5, 0, 0, 0])


def test_spiral_rank_goes_out_from_the_centre():
  rank = spiral_rank((5, 5)).reshape(5, 5)
  assert rank[2, 2] == 0
  ring1 = rank[1:4, 1:4].copy()
  ring1[1, 1] = -1
  assert sorted(ring1[ring1 >= 0].tolist()) == list(range(1, 9))
  assert sorted(rank.ravel().tolist()) == list(range(25))
  rank = spiral_rank((4, 4)).reshape(4, 4)
  assert sorted(rank[1:3, 1:3].ravel().tolist()) == [0, 1, 2, 3]
  assert spiral_rank((5,)).tolist()[2] == 0


def test_certainty_order_starts_the_most_certain_group():
  """A denoiser whose uncertainty grows with the token index, except token 5 (the most certain):
  groups start in order 5, 0, 1, 2, ..."""
  variance = jnp.asarray(np.where(np.arange(D) == 5, 0.01, 0.1 + np.arange(D)), jnp.float32)
  denoiser = lambda z, t: Prediction(jnp.zeros_like(z), jnp.broadcast_to(variance[:, None],
                                                                         z.shape))
  levels = _trajectory(dict(strategy="autoregressive", order="certainty", steps_per_group=1),
                       denoiser=denoiser)
  finish_step = np.argmax(levels[:, 0] == 0, axis=0)
  assert np.argsort(finish_step).tolist() == [5, 0, 1, 2, 3, 4, 6, 7]


def test_uniform_and_static_plans():
  levels = _trajectory(dict(strategy="uniform", num_steps=4))
  np.testing.assert_array_equal(levels[:, 0, 0], [1.0, 0.75, 0.5, 0.25, 0.0])
  with pytest.raises(ValueError, match="start every token at level 1"):
    StaticPlan(np.linspace(0.9, 0.0, 4)[:, None])
  with pytest.raises(ValueError, match="non-increasing"):
    StaticPlan(np.array([[1.0], [0.2], [0.5], [0.0]]))
  staircase = np.array([[1, 1], [0.5, 1], [0, 0.5], [0, 0]], np.float32)
  levels = _trajectory(StaticPlan(np.repeat(staircase, D // 2, axis=1)))
  np.testing.assert_array_equal(levels[:, 0, [0, D - 1]], staircase)


def test_certainty_ratio_is_one_without_context():
  """For independent elements of variance d, the exact posterior variance is the reference."""
  d = 0.3
  denoiser = analytic.GaussianDenoiser(np.zeros(D), d * np.eye(D), SCHEDULE)
  levels = jnp.asarray(np.linspace(0.02, 1.0, D)[None], jnp.float32)
  z = jnp.zeros((1, D, 1))
  ratio = certainty_ratio(jax.jit(denoiser)(z, levels).variance[..., 0], levels, SCHEDULE, d)
  np.testing.assert_allclose(np.asarray(ratio), 1.0, rtol=2e-3)


def test_budget_plan_spends_exactly_its_budget_and_lets_certain_tokens_run_ahead():
  """The fixed-budget plan: every token clean at step N, none before the loop ends (NFE = N);
  with the left half known and the per-position data variance as reference, the tokens next to
  the context run ahead of the uniform pace and the farthest keeps it."""
  known = np.arange(D) < D // 2
  values = np.linspace(1.0, 0.0, D).reshape(1, D, 1)
  n = 12
  levels = _trajectory(dict(strategy="adaptive", rule="budget", num_steps=n, exponent=2.0,
                            reference="data", data_variance=np.diag(DENOISER.cov)),
                       denoiser=DENOISER, known=values, known_mask=known[None])
  assert levels.shape[0] == n + 1 and np.all(levels[-1] == 0) and np.any(levels[-2] > 0)
  uniform = 1.0 - np.arange(n + 1) / n
  far, near = levels[:, 0, -1], levels[:, 0, D // 2]
  np.testing.assert_allclose(far, uniform, atol=1e-5)  # the least certain: the uniform pace
  assert np.all(near <= far + 1e-6) and np.any(near < far - 0.05), (near, far)
  # Exponent 0 is the uniform plan, step for step.
  flat = _trajectory(dict(strategy="adaptive", rule="budget", num_steps=n, exponent=0.0),
                     denoiser=DENOISER, known=values, known_mask=known[None])
  np.testing.assert_allclose(flat[:, 0, ~known], np.repeat(uniform[:, None], D // 2, 1),
                             atol=1e-5)


def test_budget_plan_reference_is_per_token():
  """At the first step every unknown token is at level 1 and its ratio is 1 by construction
  ('first'); with the data's own per-position variance as reference ('data') a token whose
  prior variance is larger is less certain."""
  from asyncpatch_jax.sampling.adaptive import BudgetPlan

  levels = jnp.ones((1, 4), jnp.float32)
  variance = jnp.asarray([[0.2, 0.5, 1.0, 2.0]], jnp.float32)
  mask = jnp.zeros((1, 4), bool)
  plan = BudgetPlan(10, SCHEDULE, exponent=1.0, relative=False)
  nxt, ref = plan.next_levels(jnp.int32(0), levels, variance, mask, plan.init(mask))
  np.testing.assert_allclose(np.asarray(nxt), 0.9, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(variance))
  # Later steps keep the first step's reference; halving a token's variance doubles its pace
  # relative to the reference when the level barely changes the reference.
  nxt, _ = plan.next_levels(jnp.int32(5), jnp.full((1, 4), 0.99), variance / 2, mask, ref)
  np.testing.assert_allclose(np.asarray(nxt), 0.99 * (1 - 2 / 5), rtol=2e-3)
  plan = BudgetPlan(10, SCHEDULE, reference="data", data_variance=np.array([0.4, 0.4, 4.0, 4.0]),
                    relative=False)
  nxt, _ = plan.next_levels(jnp.int32(0), levels, jnp.full((1, 4), 1.0), mask, plan.init(mask))
  np.testing.assert_allclose(np.asarray(nxt), [[0.9, 0.9, 0.6, 0.6]], atol=1e-3)
  with pytest.raises(ValueError, match="unknown certainty reference"):
    BudgetPlan(10, SCHEDULE, reference="global")


def test_autoregressive_groups_overlap_and_tiling():
  from asyncpatch_jax.sampling import make_plan
  from asyncpatch_jax.sampling.plans import autoregressive_overlap

  # A budget of 20 steps with 8 steps per group on 4 groups: the overlap follows.
  plan = make_plan("autoregressive", (4, 4), 20, schedule=SCHEDULE, steps_per_group=8,
                   group_shape="row")
  assert plan.num_groups == 4 and plan.max_steps == 20 and plan.steps_per_group == 8
  assert abs(plan.overlap - autoregressive_overlap(4, 8, 20)) < 1e-12
  assert plan.group_shape == (1, 4)
  levels = _trajectory(dict(strategy="autoregressive", num_steps=20, steps_per_group=8,
                            group_shape="row"), x_shape=(1, 4, 4, 1))
  assert levels.shape[0] == 21
  updates_per_token = (np.diff(levels, axis=0) < 0).sum(0)[0]
  np.testing.assert_array_equal(updates_per_token, 8)
  with pytest.raises(ValueError, match=r"does not tile the token grid \(4, 4\)"):
    AutoregressivePlan((4, 4), 2, group_shape=3)
  with pytest.raises(ValueError, match="more than 4 groups of 2 steps"):
    autoregressive_overlap(4, 2, 9)


def test_autoregressive_steps_per_group_from_num_steps():
  levels = _trajectory(dict(strategy="autoregressive", num_steps=12, group_shape=2))
  assert levels.shape[0] == 13  # 4 groups × S = 3


# ------------------------------------------------------------------------------------------------
# Input guidance and RePaint's schedule.


def test_input_guided_prediction_matches_its_definition():
  rng = np.random.default_rng(4)
  known = jnp.asarray(rng.standard_normal((3, D, 1)), jnp.float32)
  mask = jnp.asarray(rng.random((3, D)) < 0.5)
  z = jnp.where(mask[..., None], known, jnp.asarray(rng.standard_normal((3, D, 1)), jnp.float32))
  levels = jnp.where(mask, 0.0, 0.6)
  key = jax.random.key(7)
  guided = input_guided(DENOISER, known, mask, scale=1.5, level=0.4, schedule=SCHEDULE)
  pred, calls = jax.jit(guided)(z, levels, key)
  assert int(calls) == 2
  alpha, sigma = SCHEDULE.alpha_sigma(jnp.float32(0.4))
  eps = jax.random.normal(key, z.shape)
  clean = JIT_DENOISER(z, levels)
  noisy = JIT_DENOISER(jnp.where(mask[..., None], alpha * known + sigma * eps, z),
                   jnp.where(mask, 0.4, levels))
  expected = jnp.where(mask[..., None], clean.x0, clean.x0 + 1.5 * (clean.x0 - noisy.x0))
  np.testing.assert_allclose(np.asarray(pred.x0), np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.asarray(pred.variance), np.asarray(clean.variance), atol=1e-6)
  assert float(jnp.abs(pred.x0 - clean.x0).max()) > 1e-2  # the guidance does something


def _repaint_reference(t_T, jump_length, jump_n_sample):
  """RePaint's `get_schedule_jump` (guided_diffusion/scheduler.py) with n_sample = 1 and no
  second/third-level jumps, verbatim in logic; indices run from t_T − 1 to −1."""
  jumps = {}
  for j in range(0, t_T - jump_length, jump_length):
    jumps[j] = jump_n_sample - 1
  t = t_T
  ts = []
  while t >= 1:
    t = t - 1
    ts.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] = jumps[t] - 1
      for _ in range(jump_length):
        t = t + 1
        ts.append(t)
  ts.append(-1)
  return ts


@pytest.mark.parametrize("t_T,jump,resample", [(250, 10, 10), (100, 10, 1), (20, 5, 3), (7, 3, 2)])
def test_repaint_schedule_matches_the_reference(t_T, jump, resample):
  ours = repaint_times(t_T, jump, resample)
  np.testing.assert_array_equal(ours, np.asarray(_repaint_reference(t_T, jump, resample)) + 1)
  positions = len(range(0, t_T - jump, jump))
  assert repaint_nfe(t_T, jump, resample) == t_T + (resample - 1) * jump * positions
  # RePaint's default setting: 4570 transitions, of which 2410 are reverse steps (calls).
  assert len(repaint_times(250, 10, 10)) - 1 == 4570 and repaint_nfe(250, 10, 10) == 2410


def test_repaint_levels_are_homogeneous_and_go_back_up():
  levels = _trajectory(dict(strategy="repaint", num_steps=6, jump_length=2, resample=2))
  per_step = levels[:, 0, 0]
  assert np.all(levels == levels[:, :, :1])
  np.testing.assert_allclose(per_step * 6, repaint_times(6, 2, 2), atol=1e-5)
  assert np.any(np.diff(per_step) > 0)


def test_jit_compiles_once_per_configuration():
  fn = jax.jit(functools.partial(sample, DENOISER, x_shape=(2, D, 1), schedule=SCHEDULE,
                                 num_steps=5))
  fn(jax.random.key(0))
  fn(jax.random.key(1))
  assert fn._cache_size() == 1
