"""The sampler against exact answers: Gaussian data, where every distribution is known.

x ~ N(μ, Σ) on 8 correlated elements; `GaussianDenoiser` is the exact posterior mean and variance
for any per-token level map. Each strategy draws 4000 samples (one jitted program per case) and
the fitted Gaussian is compared with the target by KL(fit ‖ target) (sampling floor ≈ 0.0055
unconditional, 0.0018 conditional) and by the z-scores of the mean.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax.diffusion import Prediction, get_schedule
from asyncpatch_jax.sampling import analytic, masks, repaint_nfe, sample

SCHEDULE = get_schedule("cosine")
D, N = 8, 4000
MEAN = np.linspace(-0.5, 0.5, D)
COV = analytic.smooth_covariance(D, length_scale=1.5, nugget=0.05)
DENOISER = analytic.GaussianDenoiser(MEAN, COV, SCHEDULE)
KNOWN_MASK = np.array([1, 1, 0, 0, 1, 0, 0, 1], bool)
KNOWN_VALUES = np.array([1.5, 1.0, 9.0, 9.0, -1.0, 9.0, 9.0, 0.5])  # 9: never read
COND_MEAN, COND_COV = analytic.gaussian_conditional(MEAN, COV, KNOWN_MASK, KNOWN_VALUES)
KL_MAX = {False: 0.02, True: 0.01}  # unconditional, conditional


def sample_jit(denoiser, rng, x_shape, **kwargs):
  """`sample` compiled as one program (run eagerly, its loop pieces dispatch one by one)."""
  return jax.jit(functools.partial(sample, denoiser, x_shape=x_shape, **kwargs))(rng)


def _known_kwargs():
  return {"known": jnp.asarray(KNOWN_VALUES, jnp.float32).reshape(1, D, 1),
          "known_mask": KNOWN_MASK[None]}


def draw(config: dict, *, conditional: bool, n: int = N, seed: int = 0, denoiser=DENOISER):
  kwargs = _known_kwargs() if conditional else {}
  fn = jax.jit(functools.partial(sample, denoiser, x_shape=(n, D, 1), schedule=SCHEDULE,
                                 **config, **kwargs))
  x, info = fn(jax.random.key(seed))
  return np.asarray(x).reshape(n, D), jax.tree.map(np.asarray, info)


def mismatch(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
  """(KL(fitted ‖ target), the largest |z-score| of the sample mean)."""
  x = np.asarray(x, np.float64)
  z = np.abs(x.mean(0) - mean) / np.sqrt(np.diag(cov) / x.shape[0])
  return analytic.gaussian_kl(x.mean(0), np.cov(x.T), mean, cov), float(z.max())


def assert_gaussian(x, mean, cov, kl_max):
  kl, z = mismatch(x, mean, cov)
  assert kl < kl_max and z < 5.0, f"KL {kl:.4f} (max {kl_max}), mean z-score {z:.2f}"


CASES = {
    "ancestral": dict(strategy="uniform", num_steps=200),
    "ddim": dict(strategy="uniform", num_steps=100, update="ddim"),
    "heun": dict(strategy="uniform", num_steps=50, update="heun"),
    "adaptive_budget": dict(strategy="adaptive", rule="budget", num_steps=200),
    "ar_raster": dict(strategy="autoregressive", order="raster", steps_per_group=25,
                      group_shape=4, update="heun"),
    "ar_spiral_overlap": dict(strategy="autoregressive", order="spiral", steps_per_group=25,
                              group_shape=2, overlap=0.5, update="heun"),
    "ar_certainty": dict(strategy="autoregressive", order="certainty", steps_per_group=25,
                         group_shape=2, update="heun"),
}


@pytest.mark.parametrize("conditional", [False, True], ids=["joint", "conditional"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_draws_the_exact_distribution(case, conditional):
  x, info = draw(CASES[case], conditional=conditional)
  if conditional:
    known = np.broadcast_to(KNOWN_VALUES.astype(np.float32)[KNOWN_MASK], (N, KNOWN_MASK.sum()))
    np.testing.assert_array_equal(x[:, KNOWN_MASK], known)  # bit-exact
    assert_gaussian(x[:, ~KNOWN_MASK], COND_MEAN, COND_COV, KL_MAX[True])
  else:
    assert_gaussian(x, MEAN, COV, KL_MAX[False])
  assert info["nfe"] == info["nfe_per_example"].max()


def test_the_check_rejects_wrong_distributions():
  """The tolerances have teeth: too few steps, or the joint in place of the conditional, fail."""
  x, _ = draw(dict(strategy="uniform", num_steps=5), conditional=False)
  assert mismatch(x, MEAN, COV)[0] > 10 * KL_MAX[False]
  x, _ = draw(CASES["heun"], conditional=False)
  assert mismatch(x[:, ~KNOWN_MASK], COND_MEAN, COND_COV)[1] > 5.0
  shrunk = MEAN + (x - MEAN) * np.sqrt(0.85)  # 15% too little variance
  assert mismatch(shrunk, MEAN, COV)[0] > KL_MAX[False]


def test_repaint_marginal_is_right_and_resampling_approaches_the_conditional():
  """RePaint (the baseline) samples the joint correctly; conditioning by replacement is biased,
  and resampling with jumps shrinks the bias toward the exact conditional — which native
  inpainting reaches with a tenth of the calls."""
  x, info = draw(dict(strategy="repaint", num_steps=50, jump_length=5, resample=2,
                      update="ddim"), conditional=False)
  assert info["nfe"] == repaint_nfe(50, 5, 2) == 95
  assert_gaussian(x, MEAN, COV, KL_MAX[False])
  kls = []
  for resample in (1, 3, 8):
    x, info = draw(dict(strategy="repaint", num_steps=40, jump_length=5, resample=resample),
                   conditional=True)
    assert info["nfe"] == repaint_nfe(40, 5, resample) == 40 + 35 * (resample - 1)
    np.testing.assert_array_equal(x[:, KNOWN_MASK], np.broadcast_to(
        KNOWN_VALUES.astype(np.float32)[KNOWN_MASK], (N, 4)))
    kls.append(mismatch(x[:, ~KNOWN_MASK], COND_MEAN, COND_COV)[0])
  assert kls[0] > kls[1] > kls[2], kls
  assert kls[0] > 0.3  # plain replacement is far off (measured: 0.62, 0.12, 0.046)
  x, _ = draw(dict(strategy="uniform", num_steps=50, update="ddim"), conditional=True)
  assert mismatch(x[:, ~KNOWN_MASK], COND_MEAN, COND_COV)[0] < kls[2] / 5


def test_input_guidance_amplifies_what_the_context_implies():
  """ω > 0 moves the unknown elements further along the shift the clean context implies
  (the exact conditional mean − μ), more with larger ω; ω = 0 is the exact conditional."""
  delta = COND_MEAN - MEAN[~KNOWN_MASK]
  shifts = []
  for omega in (0.0, 1.0, 2.0):
    x, info = draw(dict(strategy="uniform", num_steps=40, update="ddim",
                        input_guidance=omega), conditional=True)
    assert info["nfe"] == (80 if omega else 40)
    np.testing.assert_array_equal(x[:, KNOWN_MASK], np.broadcast_to(
        KNOWN_VALUES.astype(np.float32)[KNOWN_MASK], (N, 4)))
    shifts.append((x[:, ~KNOWN_MASK].mean(0) - MEAN[~KNOWN_MASK]) @ delta / (delta @ delta))
  assert abs(shifts[0] - 1.0) < 0.03, shifts
  assert 1.1 < shifts[1] < shifts[2], shifts  # measured: 1.008, 1.184, 1.230


def test_x0_draws_restore_the_variance_that_large_steps_lose():
  """Independent Gaussian elements: the posterior is diagonal, so integrating x over
  N(x̂0, v) ('every') makes each ancestral step exact even at 2 steps, where plugging in x̂0
  loses most of the variance; drawing only the last jump ('last') restores much of it."""
  var = np.linspace(0.3, 1.5, D)
  denoiser = analytic.GaussianDenoiser(MEAN, np.diag(var), SCHEDULE)
  out = {}
  for draw_mode in ("mean", "last", "every"):
    x, info = draw(dict(strategy="uniform", num_steps=2, x0_draw=draw_mode), conditional=False,
                   denoiser=denoiser)
    assert int(info["nfe"]) == 2
    out[draw_mode] = x.var(0) / var
  np.testing.assert_allclose(out["every"], 1.0, atol=0.08)  # 4000 draws: ±0.045 per element
  assert np.all(out["mean"] < 0.8), out["mean"]
  assert np.all(out["last"] > out["mean"] + 0.3) and out["last"].mean() < 0.9, out["last"]


def test_patches_and_2d_data():
  """Tokens of 2 × 2 elements on a 4 × 4 image: one known token, the rest conditional."""
  pos = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(16, 2)
  cov = 0.95 * np.exp(-0.5 * np.sum((pos[:, None] - pos[None]) ** 2, -1) / 1.5**2) + 0.05 * np.eye(
      16)
  mean = np.zeros(16)
  denoiser = analytic.GaussianDenoiser(mean, cov, SCHEDULE, patch_size=2)
  known_mask = np.array([[True, False], [False, False]])
  element_mask = np.repeat(np.repeat(known_mask, 2, 0), 2, 1).reshape(16)
  values = np.linspace(-1.5, 1.5, 16)
  fn = jax.jit(functools.partial(
      sample, denoiser, x_shape=(N, 4, 4, 1), schedule=SCHEDULE, num_steps=60, update="ddim",
      patch_size=2, known=jnp.asarray(values, jnp.float32).reshape(1, 4, 4, 1),
      known_mask=known_mask[None]))
  x, _ = fn(jax.random.key(2))
  x = np.asarray(x).reshape(N, 16)
  np.testing.assert_array_equal(x[:, element_mask], np.broadcast_to(
      values.astype(np.float32)[element_mask], (N, 4)))
  mean_u, cov_u = analytic.gaussian_conditional(mean, cov, element_mask, values)
  assert_gaussian(x[:, ~element_mask], mean_u, cov_u, 0.03)  # floor ≈ 0.011 for 12 elements


# ------------------------------------------------------------------------------------------------
# NFE: counted by a host callback in the denoiser, against `info['nfe']` and closed forms.


def counting(denoiser, counter: list):
  def counted(z, t):
    jax.debug.callback(lambda _: counter.append(1), t[0, 0])
    return denoiser(z, t)

  return counted


NFE_CASES = [
    # (config, conditional, expected nfe)
    (dict(strategy="uniform", num_steps=7), False, 7),
    (dict(strategy="uniform", num_steps=7, update="heun"), False, 13),  # last step is Euler
    (dict(strategy="uniform", num_steps=7, input_guidance=1.0), True, 14),
    (dict(strategy="uniform", num_steps=7, update="heun", input_guidance=1.0), True, 26),
    (dict(strategy="autoregressive", steps_per_group=3, group_shape=2), False, 12),
    (dict(strategy="autoregressive", steps_per_group=3, group_shape=2), True, 9),  # 1 group known
    (dict(strategy="autoregressive", steps_per_group=3, group_shape=2, overlap=0.5), False, 7),
    (dict(strategy="autoregressive", steps_per_group=3, order="certainty"), True, 12),
    (dict(strategy="adaptive", rule="budget", num_steps=20), True, 20),  # N steps exactly
    (dict(strategy="adaptive", num_steps=20, x0_draw="every"), False, 20),
    (dict(strategy="repaint", num_steps=20, jump_length=5, resample=3), True, 50),
]


@pytest.mark.parametrize("config,conditional,expected", NFE_CASES)
def test_nfe_is_exact(config, conditional, expected):
  counter = []
  _, info = draw(config, conditional=conditional, n=3, denoiser=counting(DENOISER, counter))
  jax.effects_barrier()
  assert int(info["nfe"]) == len(counter)
  assert len(counter) == expected


@pytest.mark.parametrize("config", [
    dict(strategy="uniform", num_steps=7, update="heun"),
    dict(strategy="uniform", num_steps=7, input_guidance=1.0),
    dict(strategy="autoregressive", steps_per_group=3, order="certainty"),
    dict(strategy="adaptive", rule="budget", num_steps=20),
    dict(strategy="repaint", num_steps=20, jump_length=5, resample=3),
])
def test_everything_known_returns_known_with_no_calls(config):
  counter = []
  values = np.random.default_rng(0).standard_normal((2, D, 1)).astype(np.float32)
  fn = jax.jit(functools.partial(sample, counting(DENOISER, counter), x_shape=(2, D, 1),
                                 schedule=SCHEDULE, known=values,
                                 known_mask=np.ones((2, D), bool), **config))
  x, info = fn(jax.random.key(0))
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(x), values)
  assert int(info["nfe"]) == 0 and not counter


def test_nothing_known_is_plain_generation():
  config = dict(schedule=SCHEDULE, num_steps=10)
  x0, info0 = sample_jit(DENOISER, jax.random.key(3), (4, D, 1), **config)
  x1, info1 = sample_jit(DENOISER, jax.random.key(3), (4, D, 1), known=jnp.zeros((4, D, 1)),
                     known_mask=np.zeros((4, D), bool), **config)
  np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))
  assert int(info0["nfe"]) == int(info1["nfe"]) == 10


@pytest.mark.parametrize("update", ["ancestral", "ddim", "heun"])
def test_known_tokens_bit_exact_per_example(update):
  """Different masks and values per example, values that are not representable round-trips."""
  rng = np.random.default_rng(5)
  values = (rng.standard_normal((5, D, 1)) * 1e3 + np.pi).astype(np.float32)
  mask = masks.random_tokens(5, (D,), seed=7, known_fraction=0.4)
  x, info = sample_jit(DENOISER, jax.random.key(0), (5, D, 1), schedule=SCHEDULE, num_steps=6,
                   update=update, known=values, known_mask=mask, return_levels=True)
  x = np.asarray(x)
  np.testing.assert_array_equal(x[mask], values[mask])
  assert np.all(np.isfinite(x))
  levels = np.asarray(info["levels"])
  assert levels.shape == (7, 5, D)
  assert np.all(levels[:, mask] == 0) and np.all(levels[0][~mask] == 1)
  assert np.all(np.diff(levels, axis=0) <= 0) and np.all(levels[-1] == 0)


# ------------------------------------------------------------------------------------------------
# A batch sharded over 8 (fake CPU) devices gives the unsharded result.


SHARD_CASES = {
    "uniform_guided": dict(strategy="uniform", num_steps=6, input_guidance=1.0),
    "heun": dict(strategy="uniform", num_steps=5, update="heun"),
    "adaptive_budget": dict(strategy="adaptive", rule="budget", num_steps=8),
    "ar_certainty": dict(strategy="autoregressive", order="certainty", steps_per_group=2,
                         group_shape=2),
    "repaint": dict(strategy="repaint", num_steps=6, jump_length=2, resample=2),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_sharded_batch_equals_unsharded(case):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")
  mesh = jax.make_mesh((8,), ("data",))
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  batch = 16
  values = np.random.default_rng(1).standard_normal((batch, D, 1)).astype(np.float32)
  mask = masks.random_tokens(batch, (D,), seed=2, known_fraction=0.4)
  mask[0] = True  # one example fully known, one with nothing known
  mask[1] = False

  def run(rng, known, known_mask):
    return sample(DENOISER, rng, (batch, D, 1), schedule=SCHEDULE, known=known,
                  known_mask=known_mask, **SHARD_CASES[case])

  rng = jax.random.key(4)
  sharded = jax.jit(run, in_shardings=(replicated, data, data),
                    out_shardings=(data, replicated))
  x_sharded, info_sharded = sharded(rng, jax.device_put(values, data),
                                    jax.device_put(mask, data))
  assert x_sharded.sharding.spec == P("data")
  assert len(x_sharded.addressable_shards) == 8
  x, info = jax.jit(run)(rng, values, mask)
  np.testing.assert_allclose(np.asarray(x_sharded), np.asarray(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(info_sharded["nfe"]), np.asarray(info["nfe"]))
  np.testing.assert_array_equal(np.asarray(info_sharded["nfe_per_example"]),
                                np.asarray(info["nfe_per_example"]))
  np.testing.assert_array_equal(np.asarray(x_sharded)[mask], values[mask])


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.


def _sample(**overrides):
  kwargs = dict(schedule=SCHEDULE, num_steps=3)
  kwargs.update(overrides)
  x_shape = kwargs.pop("x_shape", (2, D, 1))
  denoiser = kwargs.pop("denoiser", DENOISER)
  return sample(denoiser, jax.random.key(0), x_shape, **kwargs)


GOOD_KNOWN = np.zeros((2, D, 1), np.float32)
GOOD_MASK = np.zeros((2, D), bool)


@pytest.mark.parametrize("overrides,match", [
    (dict(known=np.zeros((2, D + 1, 1)), known_mask=GOOD_MASK), "`known` has shape"),
    (dict(known=np.zeros((3, D, 1)), known_mask=GOOD_MASK), "`known` has shape"),
    (dict(known=GOOD_KNOWN, known_mask=np.zeros((2, D + 2), bool)), "`known_mask` has shape"),
    (dict(known=GOOD_KNOWN), "without `known_mask`"),
    (dict(known_mask=GOOD_MASK), "without `known`"),
    (dict(x_shape=(2, 4, 4, 1), patch_size=2, known=np.zeros((2, 4, 4, 1)),
          known_mask=np.zeros((2, 4, 4), bool)), "masks.to_token_mask"),
    (dict(x_shape=(2, 7, 1), patch_size=2), "not divisible by the patch"),
    (dict(strategy="spiral"), "unknown strategy"),
    (dict(strategy="uniform", order="raster"), r"unexpected keyword arguments \['order'\]"),
    (dict(strategy="adaptive", rule="fastest"), "unknown adaptive rule"),
    (dict(strategy="adaptive", rule="budget", speedup=3),
     r"unexpected keyword arguments \['speedup'\]"),
    (dict(strategy="adaptive", rule="step_size"), r"'step_size' was removed .* use rule='budget'"),
    (dict(strategy="adaptive", rule="quantile", quantile=0.5),
     r"'quantile' was removed .* use rule='budget'"),
    (dict(update="euler"), "unknown update"),
    (dict(num_steps=None), "needs `num_steps`"),
    (dict(num_steps=0), "positive integer"),
    (dict(input_guidance=1.0), "pass known and known_mask"),
    (dict(input_guidance=-1.0), "input_guidance must be >= 0"),
    (dict(input_guidance=1.0, guidance_level=0.0, known=GOOD_KNOWN, known_mask=GOOD_MASK),
     "guidance_level"),
    (dict(strategy="autoregressive", num_steps=7, group_shape=2), "disagrees|no steps_per_group"),
    (dict(strategy="autoregressive", num_steps=2), "too few"),
    (dict(strategy="autoregressive", order="zigzag", steps_per_group=2), "unknown autoregressive"),
    (dict(strategy="autoregressive", overlap=1.5, steps_per_group=2), "overlap"),
    (dict(strategy="repaint", update="heun"), "RePaint takes update"),
    (dict(strategy="repaint", input_guidance=1.0, known=GOOD_KNOWN, known_mask=GOOD_MASK),
     "RePaint"),
    (dict(denoiser=lambda z, t: z[:, :-1]), "the denoiser returned x0 of shape"),
    (dict(denoiser=lambda z, t: Prediction(z, z[..., :1, :]), strategy="adaptive"),
     "returned variance of shape"),
    (dict(denoiser=lambda z, t: 0.5 * z, strategy="adaptive"), "no variance"),
    (dict(denoiser=lambda z, t: 0.5 * z, x0_draw="last"), "x0_draw='last' reads the predicted"),
    (dict(x0_draw="every", update="ddim"), "x0_draw='every' widens ancestral steps"),
    (dict(x0_draw="always"), "unknown x0_draw"),
    (dict(strategy="autoregressive", steps_per_group=2, group_shape=3), "does not tile"),
    (dict(strategy="adaptive", rule="budget", reference="global"), "certainty reference"),
    (dict(denoiser=lambda z, t: 0.5 * z, strategy="autoregressive", order="certainty",
          steps_per_group=1, num_steps=None), "no variance"),
])
def test_bad_input_raises_clear_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    _sample(**overrides)


def test_progress_callback_reports_every_step():
  seen = []
  _sample(num_steps=4, progress=lambda step, total: seen.append((int(step), int(total))))
  jax.effects_barrier()
  assert sorted(seen) == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_schedule_by_name_and_strategy_as_plan():
  from asyncpatch_jax.sampling import StaticPlan

  plan = StaticPlan(np.linspace(1.0, 0.0, 5)[:, None].repeat(D, 1))
  x0, info0 = sample_jit(DENOISER, jax.random.key(0), (2, D, 1), schedule="cosine", strategy=plan)
  x1, info1 = sample_jit(DENOISER, jax.random.key(0), (2, D, 1), schedule=SCHEDULE,
                         num_steps=4)
  np.testing.assert_allclose(np.asarray(x0), np.asarray(x1), atol=1e-6)
  assert int(info0["nfe"]) == int(info1["nfe"]) == 4
