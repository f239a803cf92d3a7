"""The path ELBO: analytic values for Gaussian data, path independence, VDM equivalence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from asyncpatch_jax import diffusion as d
from asyncpatch_jax.diffusion import paths
from asyncpatch_jax.sampling import analytic

D = 8          # a 1-D signal of 8 elements, 1 channel
PATCH = 2      # 4 tokens of 2 elements
SCHEDULE = d.get_schedule("cosine", log_snr_min=-10.0, log_snr_max=10.0)
MU = np.linspace(-0.3, 0.3, D)
SIGMA = 0.3 * 0.8 ** np.abs(np.subtract.outer(np.arange(D), np.arange(D)))  # AR(1) covariance


def gaussian_denoiser(mu=MU, cov=SIGMA):
  """E[x | z] for x ~ N(mu, cov) and z_i = α_i x_i + σ_i ε_i (per-element levels)."""
  mu, cov = jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32)

  def denoiser(z, t):
    alpha, sigma = SCHEDULE.alpha_sigma(d.expand_levels(t, z.shape, PATCH))
    a, s2, zz = alpha[..., 0], sigma[..., 0] ** 2, z[..., 0]           # [B, D]
    cov_z = a[:, :, None] * cov * a[:, None, :] + jax.vmap(jnp.diag)(s2)
    # E[x|z] = μ + Σ A Cov(z)⁻¹ (z − A μ), through a Cholesky factor in plain JAX ops (LAPACK
    # calls from several CPU device threads at once can deadlock in OpenBLAS).
    chol = analytic.cholesky(cov_z)
    w = analytic.solve_lower(chol, a[:, :, None] * cov[None])        # L⁻¹ A Σ
    v = analytic.solve_lower(chol, (zz - a * mu)[..., None])         # L⁻¹ (z − A μ)
    return (mu + jnp.einsum("bji,bjk->bi", w, v))[..., None]

  return denoiser


def analytic_nelbo_terms():
  """E_x of each term for the optimal denoiser, in nats (float64)."""
  lam_max, lam_min = SCHEDULE.log_snr_max, SCHEDULE.log_snr_min
  logdet = lambda snr: np.linalg.slogdet(np.eye(D) + snr * SIGMA)[1]
  diffusion = 0.5 * (logdet(np.exp(lam_max)) - logdet(np.exp(lam_min)))
  a1, s1 = 1 / (1 + np.exp(-lam_min)), 1 / (1 + np.exp(lam_min))   # α², σ² at t = 1
  prior = 0.5 * np.sum(a1 * (MU**2 + np.diag(SIGMA)) + s1 - 1 - np.log(s1))
  recon = D * (0.5 * (1 + np.log(2 * np.pi)) - 0.5 * lam_max)
  return diffusion, prior, recon


def _data(batch, key=0):
  x = np.random.default_rng(key).multivariate_normal(MU, SIGMA, size=batch)
  return jnp.asarray(x[..., None], jnp.float32)


PATHS = {
    "homogeneous": lambda: paths.homogeneous(),
    "raster": lambda: paths.raster((D // PATCH,)),
    "raster_overlap": lambda: paths.raster((D // PATCH,), overlap=0.5),
    "random_order_per_example": lambda: paths.random_order((D // PATCH,), jax.random.key(3),
                                                           batch=4096),
}


@pytest.mark.parametrize("path_name", list(PATHS))
def test_optimal_denoiser_gives_analytic_elbo_on_every_path(path_name):
  x = _data(4096)
  out = jax.jit(functools.partial(d.nelbo, gaussian_denoiser(), schedule=SCHEDULE,
                                  path=PATHS[path_name](), num_steps=16,
                                  patch_size=PATCH))(x, jax.random.key(1))
  diffusion, prior, recon = analytic_nelbo_terms()
  mean, stderr = d.elbo.mean_and_stderr(out["diffusion"])
  assert abs(mean - diffusion) < 4 * stderr, (path_name, mean, diffusion, stderr)
  np.testing.assert_allclose(out["prior"].mean(), prior, rtol=0.05, atol=1e-6)
  np.testing.assert_allclose(out["recon"], recon, rtol=1e-5)
  # The bound is tight for the optimal denoiser: ≈ the differential entropy of N(μ, Σ).
  entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * SIGMA)[1]
  assert abs(float(out["total"].mean()) - entropy) < 0.05 * abs(entropy) + 4 * stderr
  np.testing.assert_allclose(out["bpd"], out["total"] / (D * np.log(2)), rtol=1e-6)
  np.testing.assert_array_equal(out["log_snr_max"], 10.0)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_diffusion_term_is_unbiased_over_many_seeds(path_name):
  # 24 seeds of 4 strata on the same 512 examples, pooled (12,288 estimates): the mean is within
  # 4 standard errors of the closed form. Few strata per token (raster: one per token) leave the
  # most room for a biased weight.
  x = _data(512, key=7)
  path = PATHS[path_name]()
  if path_name == "random_order_per_example":
    path = paths.random_order((D // PATCH,), jax.random.key(3), batch=512)
  fn = jax.jit(jax.vmap(lambda key: d.nelbo(gaussian_denoiser(), x, key, schedule=SCHEDULE,
                                            path=path, num_steps=4,
                                            patch_size=PATCH)["diffusion"]))
  runs = np.asarray(fn(jax.random.split(jax.random.key(0), 24)))
  diffusion, _, _ = analytic_nelbo_terms()
  mean, stderr = d.elbo.mean_and_stderr(runs)
  assert abs(mean - diffusion) < 4 * stderr, (path_name, mean, diffusion, stderr)
  assert stderr < 0.01 * diffusion  # and informative: a 1% bias would show


@pytest.mark.parametrize("path_name", ["homogeneous", "raster", "raster_overlap"])
def test_proposal_proportional_to_the_integrand_has_zero_variance(path_name):
  # x0 = 0 and a denoiser with e^λ ‖x_i − x̂_i‖² = n_i sigmoid(λ + log d) per token: the proposal
  # (uniform_share 0) is then exactly proportional to every token's integrand, so every draw
  # weighs F / p = N n S / 2 (S = ∫ sigmoid(λ + log d) dλ), whatever the path's speed.
  variance = 0.3
  x = jnp.zeros((64, D, 1))

  def denoiser(z, t):
    lam = SCHEDULE.log_snr(d.expand_levels(t, z.shape, PATCH))
    return jnp.sqrt(jnp.exp(-lam) * jax.nn.sigmoid(lam + np.log(variance)))

  out = d.nelbo(denoiser, x, jax.random.key(0), schedule=SCHEDULE, path=PATHS[path_name](),
                num_steps=3, patch_size=PATCH, data_variance=variance, uniform_share=0.0)
  lo, hi = SCHEDULE.log_snr_min, SCHEDULE.log_snr_max
  mass = np.logaddexp(0, hi + np.log(variance)) - np.logaddexp(0, lo + np.log(variance))
  np.testing.assert_allclose(out["diffusion"], 0.5 * D * mass, rtol=2e-3)


def test_proposal_cdf_is_the_integral_of_its_density():
  lam = jnp.linspace(SCHEDULE.log_snr_min, SCHEDULE.log_snr_max, 20001)
  for variance, share in ((0.3, 0.0), (0.01, 0.05), (2.0, 1.0)):
    q, cdf = d.elbo.log_snr_proposal(lam, SCHEDULE, variance, share)
    # Q(λ) = ∫_λ^{λ_max} q: 0 at λ_max, 1 at λ_min, and dQ/dλ = −q (trapezoid rule).
    np.testing.assert_allclose([cdf[-1], cdf[0]], [0.0, 1.0], atol=1e-5)
    steps = np.asarray(0.5 * (q[1:] + q[:-1]) * np.diff(lam))
    np.testing.assert_allclose(np.asarray(cdf[:-1] - cdf[1:]), steps, atol=2e-6)
  # Along a path, G(s) runs from 0 to 1 and its derivative is the density the weights divide by.
  grid = (1, D // PATCH)
  for path in (paths.homogeneous(), paths.raster(grid[1:], overlap=0.3)):
    g = lambda s, path=path: d.elbo.proposal_cdf(path, s, grid, SCHEDULE)
    np.testing.assert_allclose([g(jnp.zeros(1))[0], g(jnp.ones(1))[0]], [0.0, 1.0], atol=1e-5)
    s = jnp.array([0.1, 0.37, 0.8])
    for si in s:
      _, slope = jax.jvp(g, (si[None],), (jnp.ones(1),))
      tau, dtau = jax.jvp(lambda u, path=path: jnp.broadcast_to(path(u), grid[1:]), (si,),
                          (jnp.float32(1.0),))
      lam = SCHEDULE.log_snr(tau)
      q, _ = d.elbo.log_snr_proposal(lam, SCHEDULE)
      density = jnp.mean(-SCHEDULE.dlog_snr_dt(tau) * dtau * q)
      np.testing.assert_allclose(slope[0], density, rtol=2e-3)


def test_stratified_noise_is_standard_normal_per_stratum_and_latin_across_strata():
  strata = 16
  noise = d.elbo.stratified_noise(jax.random.key(0), (4000, 3), strata)
  eps = np.stack([np.asarray(noise(j)) for j in range(strata)])  # [M, 4000, 3]
  assert np.all(np.isfinite(eps))
  # Every stratum alone: N(0, 1) in each element (4,000 draws: the standard error of the mean is
  # 0.016, of the variance 0.022), the elements uncorrelated.
  np.testing.assert_allclose(eps.mean(1), 0.0, atol=0.07)
  np.testing.assert_allclose(eps.var(1), 1.0, atol=0.1)
  corr = np.corrcoef(eps[5].T)
  np.testing.assert_allclose(corr[~np.eye(3, dtype=bool)], 0.0, atol=0.07)
  # Across strata each element visits each of the M equal-probability cells exactly once.
  position = scipy.stats.norm.cdf(eps.astype(np.float64)) * strata  # cell + jitter
  lower = np.arange(strata)[:, None, None]
  assert np.all(np.abs(np.sort(position, axis=0) - lower - 0.5) <= 0.5 + 1e-4)
  # Consecutive strata (one token's share of an ordered path) spread over the distribution.
  assert np.abs(position[1] - position[0]).min() >= 2


def test_paired_difference_uses_common_random_numbers():
  x = _data(512, key=2)
  good = gaussian_denoiser()
  worse = gaussian_denoiser(mu=MU + 0.4, cov=SIGMA)
  path = paths.raster((D // PATCH,))
  fn = jax.jit(lambda den, key: d.nelbo(den, x, key, schedule=SCHEDULE, path=path,
                                        num_steps=32, patch_size=PATCH)["bpd"],
               static_argnums=0)
  same = d.elbo.paired_difference(fn(good, jax.random.key(0)), fn(good, jax.random.key(0)))
  assert same["diff"] == 0.0 and same["diff_se"] == 0.0 and same["diff_se_unpaired"] > 0
  pair = d.elbo.paired_difference(fn(worse, jax.random.key(0)), fn(good, jax.random.key(0)))
  # The shifted mean costs ½ Σ_k δ² (a KL, in nats): significant paired, hidden unpaired.
  assert pair["diff"] > 4 * pair["diff_se"]
  assert pair["diff_se"] < 0.2 * pair["diff_se_unpaired"]
  assert pair["diff"] < 2 * pair["diff_se_unpaired"]
  with pytest.raises(ValueError, match="one value per example"):
    d.elbo.paired_difference(np.zeros(3), np.zeros(4))


def test_homogeneous_integrand_is_vdm_for_any_denoiser():
  # A deliberately wrong denoiser: the optimal one for another Gaussian.
  den = gaussian_denoiser(mu=-MU, cov=2 * SIGMA + 0.1 * np.eye(D))
  x = _data(16, key=1)
  noise = jax.random.normal(jax.random.key(2), x.shape)
  for s in (0.03, 0.4, 0.9):
    got = d.elbo.diffusion_integrand(den, x, s, noise, schedule=SCHEDULE,
                                     path=paths.homogeneous(), patch_size=PATCH)
    # VDM: scalar t, z_t = α_t x + σ_t ε, loss = ½ (−dSNR/dt) ‖x − x̂‖².
    alpha, sigma = SCHEDULE.alpha_sigma(jnp.float32(s))
    z = alpha * x + sigma * noise
    t_map = jnp.full((x.shape[0], D // PATCH), s)
    neg_dsnr = -jax.grad(lambda u: jnp.exp(SCHEDULE.log_snr(u)))(jnp.float32(s))
    want = 0.5 * neg_dsnr * jnp.sum((x - den(z, t_map)) ** 2, axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_homogeneous_nelbo_matches_vdm_monte_carlo():
  den = gaussian_denoiser(mu=0.5 * MU, cov=1.5 * SIGMA)
  x = jnp.tile(_data(8, key=4), (512, 1, 1))   # 8 examples, 512 estimates each
  ours = d.nelbo(den, x, jax.random.key(5), schedule=SCHEDULE, path=paths.homogeneous(),
                 num_steps=16, patch_size=PATCH)["diffusion"].reshape(512, 8)

  # An independent VDM-style estimator: t ~ U(0, 1) per sample, one evaluation each.
  def vdm(key):
    kt, kn = jax.random.split(key)
    t = jax.random.uniform(kt, (x.shape[0],))
    alpha, sigma = SCHEDULE.alpha_sigma(t[:, None, None])
    z = alpha * x + sigma * jax.random.normal(kn, x.shape)
    neg_dsnr = -jax.vmap(jax.grad(lambda u: jnp.exp(SCHEDULE.log_snr(u))))(t)
    t_map = jnp.broadcast_to(t[:, None], (x.shape[0], D // PATCH))
    return 0.5 * neg_dsnr * jnp.sum((x - den(z, t_map)) ** 2, axis=(1, 2))

  ref = jnp.stack([vdm(k) for k in jax.random.split(jax.random.key(6), 16)]).reshape(-1, 8)
  for i in range(8):
    se = np.sqrt(ours[:, i].var() / 512 + ref[:, i].var() / ref.shape[0])
    assert abs(float(ours[:, i].mean() - ref[:, i].mean())) < 4.5 * se + 1e-3, i


def test_discrete_decoder_and_jit_and_sharding_agree():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, size=(8, D, 1)) / 127.5 - 1.0, jnp.float32)
  fn = functools.partial(d.nelbo, gaussian_denoiser(), schedule=SCHEDULE,
                         path=paths.raster((D // PATCH,), overlap=0.25), num_steps=8,
                         patch_size=PATCH, data="discrete8bit")
  eager = fn(x, jax.random.key(0))
  jitted = jax.jit(fn)(x, jax.random.key(0))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  sharded = jax.jit(fn)(xs, jax.random.key(0))
  assert len(sharded["total"].sharding.device_set) == 8
  for k in eager:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sharded[k], eager[k], rtol=1e-4, atol=1e-5)
  # A probability mass: recon ≥ 0 and bpd > 0. With λ_max = 15, σ0/α0 ≈ 5.5e-4 is far below the
  # bin half-width 1/255, so the decoder is (almost) certain; at λ_max = 10 it is not.
  assert float(eager["recon"].min()) > 0 and float(eager["bpd"].min()) > 0
  certain = d.elbo.reconstruction_nll(x, jax.random.key(1), d.get_schedule(), "discrete8bit")
  assert float(certain.max()) < 1e-3


def test_nelbo_bad_input():
  x = _data(2)
  kw = dict(schedule=SCHEDULE, num_steps=4, patch_size=PATCH)
  den = gaussian_denoiser()
  with pytest.raises(ValueError, match="not monotone"):
    d.nelbo(den, x, jax.random.key(0), path=lambda s: jnp.full((4,), jnp.sin(np.pi * s)) ** 0.0
            * jnp.where(s < 0.5, 2 * s, 1.5 - s) * (s < 1) + (s >= 1), **kw)
  with pytest.raises(ValueError, match="start with every level at 0"):
    d.nelbo(den, x, jax.random.key(0), path=lambda s: 0.5 + 0.5 * s, **kw)
  with pytest.raises(ValueError, match="do not broadcast to the token grid"):
    d.nelbo(den, x, jax.random.key(0), path=paths.raster((5,)), **kw)
  with pytest.raises(ValueError, match="8-bit grid"):
    d.nelbo(den, x, jax.random.key(0), path=paths.homogeneous(), data="discrete8bit", **kw)
  with pytest.raises(ValueError, match="unknown data kind"):
    d.nelbo(den, x, jax.random.key(0), path=paths.homogeneous(), data="bits", **kw)
  with pytest.raises(ValueError, match="overlap"):
    paths.raster((4,), overlap=1.0)
  # A proposal with (float32) zero density where the path moves tokens: e^λ-shaped for a tiny
  # data variance, it has no mass left near λ_min.
  with pytest.raises(ValueError, match="proposal density is zero"):
    d.nelbo(den, x, jax.random.key(0), path=paths.homogeneous(), data_variance=1e-30,
            uniform_share=0.0, **kw)
  with pytest.raises(ValueError, match="data_variance must be a positive"):
    d.nelbo(den, x, jax.random.key(0), path=paths.homogeneous(), data_variance=0.0, **kw)
  with pytest.raises(ValueError, match="uniform_share must lie in"):
    d.nelbo(den, x, jax.random.key(0), path=paths.homogeneous(), uniform_share=1.5, **kw)
