"""Schedules, level maps, corruption, parametrisations and the training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax import diffusion as d


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_variance_preserving_monotone_and_bounded(name):
  s = d.get_schedule(name)
  t = jnp.linspace(0.0, 1.0, 1001)
  alpha, sigma = s.alpha_sigma(t)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  lam = s.log_snr(t)
  assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease strictly"
  np.testing.assert_allclose(lam[0], s.log_snr_max, atol=1e-4)
  np.testing.assert_allclose(lam[-1], s.log_snr_min, atol=1e-4)
  assert np.isfinite(s.log_snr_min) and np.isfinite(s.log_snr_max)
  # Closed-form derivative and inverse.
  grad = jax.vmap(jax.grad(s.log_snr))(t[1:-1])
  np.testing.assert_allclose(s.dlog_snr_dt(t[1:-1]), grad, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(s.t_from_log_snr(lam), t, atol=2e-4)


def test_cosine_schedule_is_the_cosine_in_the_interior():
  s = d.get_schedule("cosine", log_snr_min=-30.0, log_snr_max=30.0)
  t = jnp.linspace(0.05, 0.95, 19)
  alpha, _ = s.alpha_sigma(t)
  np.testing.assert_allclose(alpha, jnp.cos(jnp.pi * t / 2), atol=1e-5)


def test_schedule_bad_input():
  with pytest.raises(ValueError, match="unknown schedule name 'cosin'"):
    d.get_schedule("cosin")
  with pytest.raises(ValueError, match="must be below"):
    d.get_schedule("linear", log_snr_min=5.0, log_snr_max=1.0)
  with pytest.raises(ValueError, match="finite"):
    d.get_schedule("cosine", log_snr_min=-np.inf)


@pytest.mark.parametrize("x_shape,patch,grid", [
    ((2, 16, 3), 4, (2, 4)),              # 1-D
    ((2, 8, 12, 3), 2, (2, 4, 6)),        # 2-D
    ((2, 8, 12, 3), (4, 3), (2, 2, 4)),   # 2-D, per-axis patch
    ((1, 4, 4, 4, 2), 2, (1, 2, 2, 2)),   # 3-D
])
def test_expand_levels_repeats_each_token(x_shape, patch, grid):
  assert d.token_grid(x_shape, patch) == grid
  t = jax.random.uniform(jax.random.key(0), grid)
  full = d.expand_levels(t, x_shape, patch)
  assert full.shape == x_shape
  # Every element carries its token's level; averaging back recovers the map.
  np.testing.assert_allclose(d.tokens_mean(full, patch), t, rtol=1e-6)
  patch_t = (patch,) * (len(x_shape) - 2) if isinstance(patch, int) else patch
  idx = tuple(np.array(grid[1:]) * np.array(patch_t) - 1)
  np.testing.assert_allclose(full[(0, *idx, 0)], t[(0, *(np.array(grid[1:]) - 1))])


def test_level_map_bad_input():
  x_shape = (2, 8, 8, 3)
  with pytest.raises(ValueError, match=r"level map `t` has shape \(2, 8, 8\).*needs \(2, 4, 4\)"):
    d.expand_levels(jnp.zeros((2, 8, 8)), x_shape, 2)
  with pytest.raises(ValueError, match="not divisible by the patch size 3"):
    d.token_grid(x_shape, 3)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
    d.expand_levels(jnp.full((2, 4, 4), 1.5), x_shape, 2)
  with pytest.raises(ValueError, match="patch_size"):
    d.token_grid(x_shape, (2, 2, 2))
  with pytest.raises(ValueError, match="noise has shape"):
    d.corrupt(jnp.zeros(x_shape), jnp.zeros((2, 4, 4)), jnp.zeros((2, 8, 8, 1)),
              d.get_schedule(), 2)


def test_expand_levels_shape_checked_under_jit():
  f = jax.jit(lambda t: d.expand_levels(t, (2, 8, 8, 3), 2))
  with pytest.raises(ValueError, match="level map"):
    f(jnp.zeros((2, 3, 4)))


def test_corrupt_matches_closed_form_marginal():
  s = d.get_schedule()
  x0 = jnp.broadcast_to(jnp.array([0.7, -0.3]), (4096, 4, 2))      # 1-D data, 2 channels
  t = jnp.broadcast_to(jnp.array([0.0, 0.3, 0.6, 1.0]), (4096, 4))
  z = d.corrupt(x0, t, jax.random.normal(jax.random.key(1), x0.shape), s)
  alpha, sigma = s.alpha_sigma(t[0])
  np.testing.assert_allclose(z.mean(0), alpha[:, None] * x0[0], atol=0.05)
  np.testing.assert_allclose(z.std(0), jnp.broadcast_to(sigma[:, None], (4, 2)), rtol=0.05,
                             atol=1e-3)
  # Level 0 is (nearly) exact data; level 1 (nearly) pure noise.
  np.testing.assert_allclose(z[:, 0], x0[:, 0], atol=0.01)


def test_parametrization_round_trips():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (3, 8, 8, 2))
  eps = jax.random.normal(k2, x0.shape)
  t = jax.random.uniform(k3, (3, 8, 8), minval=0.05, maxval=0.95)
  alpha, sigma = d.get_schedule().alpha_sigma(d.expand_levels(t, x0.shape))
  z = alpha * x0 + sigma * eps
  for p in d.PARAMETRIZATIONS:
    out = d.from_x0(x0, z, alpha, sigma, p)
    np.testing.assert_allclose(out, d.target(x0, eps, alpha, sigma, p), atol=2e-4)
    np.testing.assert_allclose(d.to_x0(out, z, alpha, sigma, p), x0, atol=2e-4)
  np.testing.assert_allclose(d.eps_from_x0(z, x0, alpha, sigma), eps, atol=2e-4)
  with pytest.raises(ValueError, match="unknown parametrization 'score'"):
    d.to_x0(z, z, alpha, sigma, "score")


def test_to_prediction_and_as_prediction():
  s = d.get_schedule()
  z = jnp.ones((1, 4, 4, 1))
  t = jnp.full((1, 2, 2), 0.5)
  pred = d.to_prediction(jnp.zeros_like(z), z, t, schedule=s, parametrization="eps",
                         patch_size=2, log_variance=jnp.zeros_like(z))
  alpha, _ = s.alpha_sigma(0.5)
  np.testing.assert_allclose(pred.x0, 1.0 / alpha, rtol=1e-5)
  np.testing.assert_allclose(pred.variance, 1.0)
  assert d.as_prediction(z).variance is None
  with pytest.raises(TypeError, match="Prediction"):
    d.as_prediction((z, z))


def _loss_batch(parametrization, key=0):
  k = jax.random.split(jax.random.key(key), 4)
  x0 = jax.random.normal(k[0], (4, 8, 8, 3))
  noise = jax.random.normal(k[1], x0.shape)
  t = jax.random.uniform(k[2], (4, 4, 4), minval=0.02, maxval=0.98)
  out = jax.random.normal(k[3], x0.shape)
  return x0, noise, t, out


@pytest.mark.parametrize("parametrization", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["eps", "x0", "v", "elbo"])
def test_loss_equals_weighted_x0_error(parametrization, weighting):
  s = d.get_schedule()
  x0, noise, t, out = _loss_batch(parametrization)
  got = d.diffusion_loss(out, x0, noise, t, schedule=s, parametrization=parametrization,
                         weighting=weighting, patch_size=2)["mse"]
  # Independent reference: go through x̂0 explicitly and weight ‖x̂0 − x0‖².
  tf = d.expand_levels(t, x0.shape, 2)
  alpha, sigma = s.alpha_sigma(tf)
  z = alpha * x0 + sigma * noise
  x0_hat = d.to_x0(out, z, alpha, sigma, parametrization)
  snr = alpha**2 / sigma**2
  w = {"x0": 1.0, "eps": snr, "v": 1 + snr,
       "elbo": -0.5 * jax.vmap(jax.grad(lambda u: jnp.exp(s.log_snr(u))))(tf.ravel()).reshape(
           tf.shape)}[weighting]
  want = (w * (x0_hat - x0) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(got, want, rtol=2e-3)


def test_eps_loss_is_plain_eps_mse_and_clean_tokens_are_left_out():
  s = d.get_schedule()
  x0, noise, t, out = _loss_batch("eps", key=1)
  t = t.at[:, :2].set(0.0)  # the top half is clean context
  got = d.diffusion_loss(out, x0, noise, t, schedule=s, patch_size=2)
  want = ((out - noise) ** 2)[:, 4:].mean((1, 2, 3))
  np.testing.assert_allclose(got["mse"], want, rtol=1e-5)
  np.testing.assert_allclose(got["loss"], got["mse"])  # no variance head
  # An example with every token clean contributes exactly zero.
  all_clean = d.diffusion_loss(out, x0, noise, jnp.zeros_like(t), schedule=s, patch_size=2)
  np.testing.assert_array_equal(all_clean["loss"], 0.0)


def test_uncertainty_nll_term():
  s = d.get_schedule()
  x0, noise, t, out = _loss_batch("x0", key=2)
  logvar = jnp.full(x0.shape, 0.3)
  got = d.diffusion_loss(out, x0, noise, t, schedule=s, parametrization="x0", patch_size=2,
                         log_variance=logvar, variance_weight=0.01)
  sq = (out - x0) ** 2
  nll = (0.5 * (0.3 + sq * np.exp(-0.3))).mean((1, 2, 3))
  np.testing.assert_allclose(got["nll"], nll, rtol=1e-5)
  np.testing.assert_allclose(got["loss"], got["mse"] + 0.01 * nll, rtol=1e-5)
  # The NLL trains only the variance head: the mean gets no gradient from it.
  g = jax.grad(lambda o: d.diffusion_loss(o, x0, noise, t, schedule=s, parametrization="x0",
                                          patch_size=2, log_variance=logvar)["nll"].sum())(out)
  np.testing.assert_array_equal(g, 0.0)
  # The optimal log-variance is the log of the squared error.
  lv_grad = jax.grad(lambda lv: d.diffusion_loss(out, x0, noise, t, schedule=s,
                                                 parametrization="x0", patch_size=2,
                                                 log_variance=lv)["nll"].sum())(jnp.log(sq))
  np.testing.assert_allclose(lv_grad, 0.0, atol=1e-6)


def test_loss_bad_input():
  s = d.get_schedule()
  x0, noise, t, out = _loss_batch("eps")
  with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
    d.diffusion_loss(out, x0, noise, t, schedule=s, weighting="snr", patch_size=2)
  with pytest.raises(ValueError, match="`output` has shape"):
    d.diffusion_loss(out[:, :4], x0, noise, t, schedule=s, patch_size=2)
  with pytest.raises(ValueError, match="level map `t`"):
    d.diffusion_loss(out, x0, noise, t, schedule=s, patch_size=1)


def test_loss_jit_and_sharded_match_eager():
  s = d.get_schedule()
  x0, noise, t, out = _loss_batch("v", key=3)
  x0, noise, t, out = (jnp.concatenate([a, a]) for a in (x0, noise, t, out))  # batch 8
  fn = lambda o, x, n, tt: d.diffusion_loss(o, x, n, tt, schedule=s, parametrization="v",
                                            weighting="elbo", patch_size=2,
                                            log_variance=jnp.zeros_like(o))
  eager = fn(out, x0, noise, t)
  jitted = jax.jit(fn)(out, x0, noise, t)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = [jax.device_put(a, sharding) for a in (out, x0, noise, t)]
  sharded = jax.jit(fn)(*args)
  assert len(sharded["loss"].sharding.device_set) == 8
  for k in eager:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-5)
    np.testing.assert_allclose(sharded[k], eager[k], rtol=1e-5)
