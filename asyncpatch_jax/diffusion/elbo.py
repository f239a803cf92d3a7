"""The negative ELBO along a monotone path of per-token levels (docs/method.md).

For a path τ: [0, 1] → [0, 1]^N (every coordinate non-decreasing, τ(0) = 0, τ(1) = 1):

  −ELBO_τ = E[−log p(x | z(0))] + KL(q(z(1) | x) ‖ N(0, I))
            + ½ ∫₀¹ Σ_i (−d/ds SNR(τ_i(s))) E‖x_i − x̂_i(z(s), τ(s))‖² ds.

Each coordinate is a time-changed 1-D diffusion, so frozen coordinates (τ_i' = 0) contribute
nothing and the homogeneous path τ_i(s) = s is VDM's continuous-time ELBO.

The diffusion integral I = ∫₀¹ F(s) ds, F(s) = Σ_i f_i(s), is estimated by importance sampling
in s with a proposal built per token in log-SNR. Writing λ_i(s) = λ(τ_i(s)) and
a_i(s) = −λ'(τ_i(s)) τ_i'(s) ≥ 0 (the speed at which token i's log-SNR falls),

  f_i(s) = ½ a_i(s) · e^{λ_i} ‖x_i − x̂_i‖².

For a near-optimal denoiser e^λ E‖x_i − x̂_i‖² ≈ n_i · sigmoid(λ + log d) (n_i elements of data
variance d: the posterior variance d / (1 + d e^λ) times e^λ), so in λ every token's integrand
has the same shape, and in s it is that shape pushed through τ_i. The proposal is the same
push-forward of a density q on [λ_min, λ_max]:

  q(λ) = (1 − η) sigmoid(λ + log d) / S + η / (λ_max − λ_min),   S = ∫ sigmoid(λ + log d) dλ,
  p(s) = (1/N) Σ_i a_i(s) q(λ_i(s)),   G(s) = ∫₀ˢ p = (1/N) Σ_i Q(λ_i(s)),

with Q(λ) = ∫_λ^{λ_max} q, closed-form through softplus. G runs from 0 to 1, so p is a
density whose CDF is known exactly for any monotone path, and the weight

  F(s) / p(s) = N Σ_i a_i ½ e^{λ_i} ‖x_i − x̂_i‖² / Σ_i a_i q(λ_i)

cancels the path's speed a_i: along an ordered path (one token moving at a time) it is
N ½ e^λ ‖x_k − x̂_k‖² / q(λ), free of the 1/t spike of the cosine schedule's λ'. The uniform
share η (defensive mixture) bounds the weight where the sigmoid underestimates the integrand
(a poor network at low SNR); η = 1 is the proposal uniform in λ.

The M = `num_steps` draws are stratified in G: s_j = G⁻¹((j + u_j) / M) with an independent
u_j ~ U(0, 1) per stratum and per example (G⁻¹ by bisection), so Î = (1/M) Σ_j F(s_j) / p(s_j) is
unbiased for every example: E Î = Σ_j ∫_{stratum j} F = I. Each token carries mass 1/N of G,
so along an ordered path with M = kN strata each token's segment gets k strata of its own with
independent offsets; with M < N a stratum covers N/M tokens and picks one of them with the
probability of its proposal mass, which the weight 1/p undoes (token subsampling, unbiased).
The noise ε_j of stratum j is exactly N(0, I) but Latin-hypercube across strata
(`stratified_noise`): at high SNR the squared error is ≈ e^{−λ} ‖ε‖², whose χ² spread is most of
the remaining variance on the homogeneous path. Nothing here depends on the denoiser: two
denoisers evaluated with the same `rng` see the same x0, s and noise (common random numbers), so
per-example differences of their bounds have a far smaller variance than the bounds
(`paired_difference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion.corruption import corrupt
from asyncpatch_jax.diffusion.level_map import PatchSize, token_grid, tokens_sum
from asyncpatch_jax.diffusion.parametrization import as_prediction
from asyncpatch_jax.diffusion.paths import Path, check_path
from asyncpatch_jax.diffusion.schedules import Schedule

Array = jax.Array
DATA_KINDS = ("continuous", "discrete8bit")
DATA_VARIANCE = 0.25   # d of the proposal: a per-element variance typical of images in [-1, 1]
UNIFORM_SHARE = 0.02   # η: the proposal's share uniform in λ
BISECTION_STEPS = 30   # G⁻¹ to float32 resolution in s ∈ [0, 1]


def _check_proposal_parameters(data_variance: float, uniform_share: float) -> None:
  if not (math.isfinite(data_variance) and data_variance > 0):
    raise ValueError(f"data_variance must be a positive number (the data's per-element "
                     f"variance, ≈ 0.25 for images in [-1, 1]), got {data_variance}")
  if not 0.0 <= uniform_share <= 1.0:
    raise ValueError(f"uniform_share must lie in [0, 1] (1: uniform in log-SNR), got "
                     f"{uniform_share}")


def log_snr_proposal(log_snr: Array, schedule: Schedule, data_variance: float = DATA_VARIANCE,
                     uniform_share: float = UNIFORM_SHARE) -> tuple[Array, Array]:
  """(q(λ), Q(λ) = ∫_λ^{λ_max} q) of the per-token proposal in log-SNR, elementwise.

  q = (1 − η) sigmoid(λ + log d) / S + η / (λ_max − λ_min) integrates to 1 on
  [λ_min, λ_max]; Q runs from 0 at λ_max to 1 at λ_min.
  """
  lam = jnp.asarray(log_snr, jnp.float32)
  lo, hi, c = schedule.log_snr_min, schedule.log_snr_max, math.log(data_variance)
  softplus = lambda v: np.logaddexp(0.0, v)
  mass = float(softplus(hi + c) - softplus(lo + c))  # S
  density = ((1.0 - uniform_share) * jax.nn.sigmoid(lam + c) / mass
             + uniform_share / (hi - lo))
  # softplus(hi + c) − softplus(λ + c) = log(1 + (e^{hi−λ} − 1) / (1 + e^{−λ−c})), accurate
  # as λ → hi, where most tokens of an ordered path sit at any s.
  head = jnp.log1p(jnp.expm1(hi - lam) * jax.nn.sigmoid(lam + c))
  cumulative = (1.0 - uniform_share) * head / mass + uniform_share * (hi - lam) / (hi - lo)
  return density, cumulative


def _token_terms(denoiser: Callable, x0: Array, s: Array, noise: Array, schedule: Schedule,
                 path: Path, patch_size: PatchSize) -> tuple[Array, Array, Array]:
  """Per token at `s` `[B]`: the log-SNR λ_i, the speed a_i = −dλ_i/ds ≥ 0, and
  ½ e^{λ_i} ‖x_i − x̂_i(z(s), τ(s))‖², each `[B, *grid]`."""
  grid = token_grid(x0.shape, patch_size)
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x0.shape[0],))
  s = s.reshape((-1,) + (1,) * (len(grid) - 1))  # [B, 1, ..., 1]: broadcasts against the grid
  tau, dtau = jax.jvp(lambda u: jnp.broadcast_to(path(u), grid), (s,), (jnp.ones_like(s),))
  z = corrupt(x0, tau, noise, schedule, patch_size)
  x0_hat = as_prediction(denoiser(z, tau)).x0
  sq_err = tokens_sum(jnp.square(x0.astype(jnp.float32) - x0_hat), patch_size)
  lam = schedule.log_snr(tau)
  # −dλ/ds = −λ'(τ) τ'(s) ≥ 0; frozen tokens (τ' = 0) contribute nothing.
  speed = jnp.where(dtau > 0, -schedule.dlog_snr_dt(tau) * dtau, 0.0)
  return lam, speed, 0.5 * jnp.exp(lam) * sq_err


def diffusion_integrand(denoiser: Callable, x0: Array, s: Array, noise: Array, *,
                        schedule: Schedule, path: Path, patch_size: PatchSize = 1) -> Array:
  """F(s) = ½ Σ_i (−d/ds SNR(τ_i(s))) ‖x_i − x̂_i(z(s), τ(s))‖² per example.

  `s` is a scalar or one value per example `[B]`; `noise` is the ε of z(s).
  """
  _, speed, scaled_err = _token_terms(denoiser, x0, s, noise, schedule, path, patch_size)
  return (speed * scaled_err).reshape(x0.shape[0], -1).sum(-1)


def proposal_cdf(path: Path, s: Array, grid: tuple[int, ...], schedule: Schedule,
                 data_variance: float = DATA_VARIANCE,
                 uniform_share: float = UNIFORM_SHARE) -> Array:
  """G(s) = (1/N) Σ_i Q(λ(τ_i(s))) for `s` `[B]`: the proposal's CDF in s, per example."""
  s = jnp.asarray(s, jnp.float32).reshape((-1,) + (1,) * (len(grid) - 1))
  tau = jnp.broadcast_to(path(s), grid)
  _, cumulative = log_snr_proposal(schedule.log_snr(tau), schedule, data_variance, uniform_share)
  return cumulative.reshape(grid[0], -1).mean(-1)


def _inverse_cdf(cdf: Callable[[Array], Array], u: Array) -> Array:
  """s with cdf(s) = u for a non-decreasing `cdf` on [0, 1], by bisection (elementwise in u)."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = cdf(mid) < u
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, halve, (jnp.zeros_like(u), jnp.ones_like(u)))
  return 0.5 * (lo + hi)


def stratified_noise(rng: Array, shape: tuple[int, ...], num_steps: int
                     ) -> Callable[[Array], Array]:
  """`j -> ε_j` for strata j < M: each ε_j ~ N(0, I) exactly, Latin-hypercube across strata.

  Element k of ε_j is Φ⁻¹((c_j + w) / M) with the cell c_j = (a j + c_k) mod M, a random shift
  c_k per element and a fresh w ~ U(0, 1): c_j is uniform for every j, so ε_j is standard normal
  and its elements independent, but over the M strata each element visits every cell once, so
  Σ_j ε_j² hardly varies (the χ² noise of the squared error at high SNR, most of the estimator's
  variance on the homogeneous path). The stride a ≈ 0.618 M (coprime to M) spreads consecutive
  strata, those of one token along an ordered path, over the whole distribution.
  """
  stride = max(1, round(0.618 * num_steps))
  while math.gcd(stride, num_steps) != 1:
    stride += 1
  k_shift, k_jitter = jax.random.split(rng)
  shift = jax.random.randint(k_shift, shape, 0, num_steps)

  def noise(j: Array) -> Array:
    cell = (jnp.asarray(j, jnp.int32) * stride + shift) % num_steps
    w = jax.random.uniform(jax.random.fold_in(k_jitter, j), shape,
                           minval=jnp.finfo(jnp.float32).tiny)
    below = (cell + w) / num_steps                    # u
    above = ((num_steps - 1 - cell) + (1.0 - w)) / num_steps  # 1 − u, without rounding to 0
    return jnp.where(below < 0.5, jax.scipy.special.ndtri(below),
                     -jax.scipy.special.ndtri(above))

  return noise


def check_proposal(path: Path, grid: tuple[int, ...], schedule: Schedule,
                   data_variance: float = DATA_VARIANCE, uniform_share: float = UNIFORM_SHARE,
                   num_points: int = 129) -> None:
  """Raises a ValueError where the proposal has no mass (in float32) on an interval of s on which
  the path moves a token, so the integrand is not zero there but would never be sampled.

  Evaluates the path at trace time; a path that depends on traced arrays is not checked.
  """
  _check_proposal_parameters(data_variance, uniform_share)
  try:
    with jax.ensure_compile_time_eval():
      s = jnp.linspace(0.0, 1.0, num_points)
      tau = jax.vmap(lambda u: jnp.broadcast_to(path(u), grid))(s)  # [P, *grid]
      _, cumulative = log_snr_proposal(schedule.log_snr(tau), schedule, data_variance,
                                       uniform_share)
      tau = np.asarray(tau).reshape(num_points, grid[0], -1)
      cdf = np.asarray(cumulative).reshape(num_points, grid[0], -1).mean(-1)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return  # the path depends on traced values
  flat = (np.diff(tau, axis=0) > 0).any(-1) & (np.diff(cdf, axis=0) <= 0)  # [P − 1, B]
  if flat.any():
    where = np.flatnonzero(flat.any(-1))
    raise ValueError(
        f"the proposal density is zero (in float32) for s in [{s[where[0]]:.4g}, "
        f"{s[where[-1] + 1]:.4g}], where the path moves tokens and the integrand is not zero: "
        f"those levels would never be sampled. Raise uniform_share above {uniform_share} or "
        f"bring data_variance ({data_variance}) closer to the data's per-element variance")


def paired_difference(a: Array | np.ndarray, b: Array | np.ndarray) -> dict[str, float]:
  """Mean and standard error of `a`, of `b` and of the per-example difference `a − b`.

  With per-example bounds of two denoisers evaluated with the same `rng` (common random numbers)
  the difference's standard error is the one that says whether one model is better.
  """
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"paired values need one value per example on both sides, got {a.size} "
                     f"and {b.size}")
  out = {}
  for name, v in (("a", a), ("b", b), ("diff", a - b)):
    out[name], out[f"{name}_se"] = mean_and_stderr(v)
  # The unpaired standard error of the difference, for comparison.
  out["diff_se_unpaired"] = math.hypot(out["a_se"], out["b_se"])
  return out


def mean_and_stderr(values: Array | np.ndarray) -> tuple[float, float]:
  """The mean of per-example values and its standard error (nan for fewer than 2 values)."""
  v = np.asarray(values, np.float64).reshape(-1)
  se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
  return float(v.mean()), se


def prior_kl(x0: Array, schedule: Schedule) -> Array:
  """KL(q(z(1) | x) ‖ N(0, I)) per example, in nats (every token at level 1)."""
  alpha, sigma = schedule.alpha_sigma(jnp.ones((), jnp.float32))
  kl = 0.5 * (jnp.square(alpha * x0) + jnp.square(sigma) - 1.0 - 2.0 * jnp.log(sigma))
  return kl.reshape(x0.shape[0], -1).sum(-1)


def reconstruction_nll(x0: Array, rng: Array, schedule: Schedule, data: str) -> Array:
  """E[−log p(x | z(0))] per example, in nats (every token at level 0).

  'continuous': the Gaussian decoder N(x; z0/α0, σ0²/α0²), whose expectation is closed-form.
  'discrete8bit': VDM's decoder over the 256 values 2k/255 − 1 with logits
  −½ ((z0/α0 − x_k) α0/σ0)², estimated with one sample of z0.
  """
  alpha, sigma = schedule.alpha_sigma(jnp.zeros((), jnp.float32))
  num = math.prod(x0.shape[1:])
  if data == "continuous":
    per_elem = 0.5 * (1.0 + jnp.log(2.0 * jnp.pi)) + jnp.log(sigma / alpha)
    return jnp.full((x0.shape[0],), per_elem * num)
  z0 = alpha * x0 + sigma * jax.random.normal(rng, x0.shape)
  values = 2.0 * jnp.arange(256, dtype=jnp.float32) / 255.0 - 1.0
  logits = -0.5 * jnp.square((z0[..., None] / alpha - values) * (alpha / sigma))
  k = jnp.clip(jnp.round((x0 + 1.0) * 127.5), 0, 255).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), k[..., None], -1)[..., 0]
  return -logp.reshape(x0.shape[0], -1).sum(-1)


def _check_discrete(x0: Array) -> None:
  if isinstance(x0, jax.core.Tracer):
    return
  v = np.asarray(x0, np.float64)
  k = np.round((v + 1.0) * 127.5)
  if v.min() < -1 - 1e-6 or v.max() > 1 + 1e-6 or np.abs(k / 127.5 - 1.0 - v).max() > 1e-3:
    raise ValueError("data='discrete8bit' needs x0 on the 8-bit grid 2k/255 − 1 (images scaled "
                     "as uint8 / 127.5 − 1); use data='continuous' for other data")


def nelbo(denoiser: Callable, x0: Array, rng: Array, *, schedule: Schedule, path: Path,
          num_steps: int, patch_size: PatchSize = 1, data: str = "continuous",
          data_variance: float = DATA_VARIANCE,
          uniform_share: float = UNIFORM_SHARE) -> dict[str, Array]:
  """The negative ELBO of each example along `path`, in nats, and bits per dimension.

  Unbiased for every example; the module docstring derives the estimator of the diffusion term.
  The same `rng` gives the same s and noise for any denoiser (common random numbers).

  Args:
    denoiser: `(z, t) -> x0_hat | Prediction`.
    x0: data `[B, *spatial, C]` (in [-1, 1] for images).
    rng: randomness for s, the noise and the decoder.
    path: `s -> level map`, see `asyncpatch_jax.diffusion.paths`.
    num_steps: number of strata in s (one network evaluation each).
    data: 'continuous' (Gaussian decoder, density) or 'discrete8bit' (probability mass).
    data_variance: d of the proposal sigmoid(λ + log d) (the data's per-element variance; a
      mismatch costs variance, never bias).
    uniform_share: η, the proposal's share uniform in log-SNR.

  Returns:
    Per-example `[B]` arrays 'diffusion', 'prior', 'recon', 'total' (nats) and 'bpd', plus the
    'log_snr_min' / 'log_snr_max' the integral runs between.
  """
  if data not in DATA_KINDS:
    raise ValueError(f"unknown data kind {data!r}; choose one of {DATA_KINDS}")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
  grid = token_grid(x0.shape, patch_size)
  check_path(path, grid)
  check_proposal(path, grid, schedule, data_variance, uniform_share)
  if data == "discrete8bit":
    _check_discrete(x0)
  x0 = jnp.asarray(x0, jnp.float32)
  k_offset, k_noise, k_recon = jax.random.split(rng, 3)
  cdf = lambda s: proposal_cdf(path, s, grid, schedule, data_variance, uniform_share)
  noise_cells = stratified_noise(k_noise, x0.shape, int(num_steps))

  def step(total, j):
    # Stratum j of the proposal's CDF, with its own offset per example, and its noise.
    u = (j + jax.random.uniform(jax.random.fold_in(k_offset, j), (x0.shape[0],))) / num_steps
    s = _inverse_cdf(cdf, u)
    noise = noise_cells(j)
    lam, speed, scaled_err = _token_terms(denoiser, x0, s, noise, schedule, path, patch_size)
    q, _ = log_snr_proposal(lam, schedule, data_variance, uniform_share)
    # F(s) / p(s) with p = (1/N) Σ_i a_i q(λ_i); p = 0 only where no token moves (F = 0).
    numerator = (speed * scaled_err).reshape(x0.shape[0], -1).sum(-1)
    density = (speed * q).reshape(x0.shape[0], -1).mean(-1)
    weight = jnp.where(density > 0, numerator / jnp.where(density > 0, density, 1.0), 0.0)
    return total + weight, None

  total, _ = jax.lax.scan(step, jnp.zeros((x0.shape[0],), jnp.float32),
                          jnp.arange(num_steps, dtype=jnp.int32))
  out = {
      "diffusion": total / num_steps,
      "prior": prior_kl(x0, schedule),
      "recon": reconstruction_nll(x0, k_recon, schedule, data),
  }
  out["total"] = out["diffusion"] + out["prior"] + out["recon"]
  out["bpd"] = out["total"] / (math.prod(x0.shape[1:]) * math.log(2.0))
  out["log_snr_min"] = jnp.full((x0.shape[0],), schedule.log_snr_min, jnp.float32)
  out["log_snr_max"] = jnp.full((x0.shape[0],), schedule.log_snr_max, jnp.float32)
  return out
