"""The path ELBO's standard error: the importance-sampled estimator vs the old one (issue 17).

Part 1, exact: Gaussian data x ~ N(μ, Σ) and its exact posterior-mean denoiser
(`sampling.analytic.GaussianDenoiser`), where E_x of the diffusion term is known in closed form
on every path, ½ [log det(I + e^{λ_max} Σ) − log det(I + e^{λ_min} Σ)]. For each path it
reports the mean diffusion term over `--examples` examples, its standard error (std / √B) and
relative standard error, the distance to the closed form in standard errors, for the library's
estimator (`diffusion.nelbo`) and for the old one (one uniform offset per example, s uniform in
[0, 1]: kept here only as a reference). It also reports the floor no estimator of per-example
bounds can beat: the spread over examples of the exact per-example term (by quadrature in λ),
so the estimator's own share of the variance is visible.

  - 'homogeneous', 'raster', 'random' (an order per example): 16 one-element tokens with an AR(1)
    covariance 0.3 · 0.8^|i−j|, cosine schedule λ ∈ [−15, 15], 256 strata;
  - 'grid8x8': an 8×8 grid of one-pixel tokens (separable AR(1) covariance), raster order,
    16 strata (four tokens per stratum: token subsampling).

Part 2 (with `--mnist_workdir`): bits/dim of two checkpoints of a trained MNIST run along the
raster and homogeneous paths, old and new estimator, and the paired difference of the two
checkpoints (same x0, s and noise) against the unpaired one.

    python benchmarks/elbo_variance.py                   # writes results/elbo_variance.json
    python benchmarks/elbo_variance.py --mnist_workdir /tmp/mnist --mnist_steps 600,2400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax import diffusion, pixels
from asyncpatch_jax.diffusion import elbo, paths
from asyncpatch_jax.sampling import analytic

GOALS = {"homogeneous": 0.0005, "raster": 0.002, "random": 0.005, "grid8x8": 0.01}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--examples", type=int, default=4096)
  p.add_argument("--strata", type=int, default=256, help="strata of the 1-D paths")
  p.add_argument("--grid_strata", type=int, default=16, help="strata of the 8×8 grid")
  p.add_argument("--seeds", type=int, default=3, help="repeats of each estimate")
  p.add_argument("--cases", default="homogeneous,raster,random,grid8x8")
  p.add_argument("--mnist_workdir", default="", help="a trained configs/mnist.py run")
  p.add_argument("--mnist_steps", default="", help="two checkpoint steps, e.g. '600,2400'")
  p.add_argument("--mnist_examples", type=int, default=256)
  p.add_argument("--mnist_strata", type=int, default=16)
  p.add_argument("--out", default="results/elbo_variance.json")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The old estimator, as a reference only: s_j = (j + u) / M with one u per example.


def old_diffusion_term(denoiser, x0, rng, *, schedule, path, num_steps, patch_size=1):
  """The diffusion term as `nelbo` estimated it before issue 17 (per example, nats)."""
  k_offset, k_noise = jax.random.split(rng)
  offset = jax.random.uniform(k_offset, (x0.shape[0],))

  def step(total, j):
    s = (j + offset) / num_steps
    noise = jax.random.normal(jax.random.fold_in(k_noise, j), x0.shape)
    return total + elbo.diffusion_integrand(denoiser, x0, s, noise, schedule=schedule, path=path,
                                            patch_size=patch_size), None

  total, _ = jax.lax.scan(step, jnp.zeros((x0.shape[0],), jnp.float32),
                          jnp.arange(num_steps, dtype=jnp.float32))
  return total / num_steps


# ------------------------------------------------------------------------------------------------
# Part 1: the exact Gaussian denoiser.


def ar1(size: int, rho: float = 0.8) -> np.ndarray:
  return rho ** np.abs(np.subtract.outer(np.arange(size), np.arange(size)))


def gaussian_case(name: str, examples: int, strata: int, grid_strata: int) -> dict[str, Any]:
  """Data, denoiser and path of one case."""
  if name == "grid8x8":
    cov = 0.3 * np.kron(ar1(8), ar1(8))
    shape, grid, num_steps = (8, 8, 1), (8, 8), grid_strata
  else:
    cov = 0.3 * ar1(16)
    shape, grid, num_steps = (16, 1), (16,), strata
  mean = np.linspace(-0.3, 0.3, cov.shape[0])
  schedule = diffusion.get_schedule("cosine")
  x = np.random.default_rng(0).multivariate_normal(mean, cov, size=examples)
  positions = None
  if name == "homogeneous":
    path = paths.homogeneous()
  elif name == "random":
    path = paths.random_order(grid, jax.random.key(3), batch=examples)
    keys = jax.random.split(jax.random.key(3), examples)
    positions = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 16))(keys))
  else:
    path = paths.raster(grid)
  return dict(x0=jnp.asarray(x.reshape(examples, *shape), jnp.float32), x=x, mean=mean, cov=cov,
              schedule=schedule, path=path, num_steps=num_steps, positions=positions,
              denoiser=analytic.GaussianDenoiser(mean, cov, schedule))


def closed_form(cov: np.ndarray, schedule) -> float:
  logdet = lambda snr: np.linalg.slogdet(np.eye(len(cov)) + snr * cov)[1]
  return 0.5 * (logdet(math.exp(schedule.log_snr_max)) - logdet(math.exp(schedule.log_snr_min)))


def exact_per_example(case: dict[str, Any], nodes: int = 256) -> np.ndarray:
  """The diffusion term of each example averaged over the noise only, by Gauss–Legendre
  quadrature in the log-SNR of the moving token(s) (float64). The spread of these values over
  examples is the floor of any estimator's standard error."""
  schedule, cov, mean = case["schedule"], case["cov"], case["mean"]
  lo, hi = schedule.log_snr_min, schedule.log_snr_max
  g, w = np.polynomial.legendre.leggauss(nodes)
  lams, weights = 0.5 * (hi - lo) * g + 0.5 * (hi + lo), 0.5 * (hi - lo) * w
  size = len(cov)
  r = case["x"] - mean  # [B, D]

  def error_terms(log_snr: np.ndarray):
    """(I − KA), diag(K N Kᵀ) for per-element log-SNRs [..., D] (levels: +inf clean)."""
    alpha2 = np.where(np.isinf(log_snr), 1.0, 1.0 / (1.0 + np.exp(-log_snr)))
    sigma2 = np.where(np.isinf(log_snr), 0.0, 1.0 / (1.0 + np.exp(log_snr)))
    a = np.sqrt(alpha2)
    m = a[..., :, None] * cov * a[..., None, :] + np.eye(size) * sigma2[..., None, :]
    k = np.swapaxes(np.linalg.solve(m, a[..., :, None] * cov), -1, -2)  # K = Σ A M⁻¹
    bias = np.eye(size) - k * a[..., None, :]
    return bias, np.einsum("...ij,...j,...ij->...i", k, sigma2, k)

  if case["positions"] is None and case["path"](jnp.float32(0.5)).ndim == 0:  # homogeneous
    bias, var = error_terms(np.broadcast_to(lams[:, None], (nodes, size)))
    mat = np.einsum("n,nki,nkj->ij", weights * np.exp(lams), bias, bias)
    const = np.sum(weights * np.exp(lams) * var.sum(-1))
    return 0.5 * (const + np.einsum("bi,ij,bj->b", r, mat, r))

  def ordered_terms(order: np.ndarray):
    """M and c of an ordered path (`order[k]`: the element noised k-th) with per-example value
    ½ (c + rᵀ M r)."""
    mat, const = np.zeros((size, size)), 0.0
    for k, elem in enumerate(order):
      levels = np.full((nodes, size), np.inf)  # clean: not yet noised
      levels[:, order[:k]] = lo                # noised before: level 1
      levels[:, elem] = lams
      bias, var = error_terms(levels)
      row = bias[:, elem, :]                    # [nodes, D]
      mat += np.einsum("n,ni,nj->ij", weights * np.exp(lams), row, row)
      const += np.sum(weights * np.exp(lams) * var[:, elem])
    return mat, const

  if case["positions"] is None:  # raster: the last-generated token is noised first
    mat, const = ordered_terms(np.arange(size)[::-1])
    return 0.5 * (const + np.einsum("bi,ij,bj->b", r, mat, r))
  out = np.empty(len(r))
  for b, pos in enumerate(case["positions"]):
    mat, const = ordered_terms(np.argsort(pos)[::-1])
    out[b] = 0.5 * (const + r[b] @ mat @ r[b])
  return out


def summarize(values: np.ndarray, target: float) -> dict[str, float]:
  mean, se = elbo.mean_and_stderr(values)
  return {"mean": mean, "se": se, "rel_se": se / abs(target), "z": (mean - target) / se}


def part_gaussian(args) -> dict[str, Any]:
  results = {}
  for name in args.cases.split(","):
    case = gaussian_case(name, args.examples, args.strata, args.grid_strata)
    target = closed_form(case["cov"], case["schedule"])
    kw = dict(schedule=case["schedule"], path=case["path"], num_steps=case["num_steps"])
    new = jax.jit(lambda x, k, kw=kw, case=case: elbo.nelbo(case["denoiser"], x, k,
                                                            data_variance=0.3, **kw)["diffusion"])
    old = jax.jit(lambda x, k, kw=kw, case=case: old_diffusion_term(case["denoiser"], x, k, **kw))
    row: dict[str, Any] = {"closed_form_nats": target, "strata": case["num_steps"],
                           "examples": args.examples, "tokens": int(case["x"].shape[1]),
                           "goal_rel_se": GOALS.get(name)}
    start = time.monotonic()
    exact = exact_per_example(case)
    row["exact_per_example"] = summarize(exact, target)
    row["exact_per_example"]["seconds"] = time.monotonic() - start
    for label, fn in (("new", new), ("old", old)):
      runs, seconds = [], []
      for seed in range(args.seeds):
        start = time.monotonic()
        v = np.asarray(fn(case["x0"], jax.random.key(100 + seed)), np.float64)
        seconds.append(time.monotonic() - start)
        run = summarize(v, target)
        run["rel_se_estimator_only"] = float((v - exact).std(ddof=1) / math.sqrt(len(v))
                                             / abs(target))
        runs.append(run)
      row[label] = {"runs": runs, "rel_se": float(np.mean([r["rel_se"] for r in runs])),
                    "max_abs_z": float(np.max(np.abs([r["z"] for r in runs]))),
                    "seconds": seconds}
      print(f"{name:12s} {label}: rel SE {row[label]['rel_se']:.4%} "
            f"(estimator only {np.mean([r['rel_se_estimator_only'] for r in runs]):.4%}), "
            f"max |z| {row[label]['max_abs_z']:.2f}; floor (exact per example) "
            f"{row['exact_per_example']['rel_se']:.4%}", flush=True)
    row["goal_met"] = row["new"]["rel_se"] <= GOALS.get(name, float("inf"))
    results[name] = row
  return results


# ------------------------------------------------------------------------------------------------
# Part 2: a trained MNIST network.


def part_mnist(args) -> dict[str, Any]:
  from absl import logging

  from asyncpatch_jax import data as data_lib
  from asyncpatch_jax import models
  from asyncpatch_jax.train import builders
  from asyncpatch_jax.train import restore as restore_lib

  logging.set_verbosity(logging.WARNING)
  with open(os.path.join(args.mnist_workdir, "config.json")) as f:
    import ml_collections
    config = ml_collections.ConfigDict(json.load(f))
  steps = [int(s) for s in args.mnist_steps.split(",")]
  nets = {}
  for step in steps:
    _, _, setup, state, _ = restore_lib.restore_latest(config, args.mnist_workdir, step=step)
    nets[step] = (setup, state.ema[restore_lib.ema_params_name(config)], state.model_state)
  schedule = builders.make_schedule(config.diffusion)
  patch = int(config.diffusion.patch_size)
  images, labels = data_lib.reference_images(config.data, args.mnist_examples)
  x0 = jnp.asarray(pixels.to_model_range(images))
  labels = jnp.asarray(labels, jnp.int32)
  grid = diffusion.token_grid(x0.shape, patch)
  variance = float(np.var(np.asarray(x0)))
  dims = math.prod(x0.shape[1:]) * math.log(2.0)
  out: dict[str, Any] = {"steps": steps, "examples": int(x0.shape[0]),
                         "strata": args.mnist_strata, "data_variance": variance}
  for path_name in ("raster", "homogeneous"):
    path = paths.homogeneous() if path_name == "homogeneous" else paths.raster(grid[1:])
    per_step: dict[str, dict[int, np.ndarray]] = {"new": {}, "old": {}}
    for step, (setup, params, model_state) in nets.items():
      def denoise(params, model_state, setup=setup):
        model = setup.model_def.merge(params, model_state)
        return models.make_denoiser(model, schedule=schedule,
                                    parametrization=config.model.parametrization,
                                    patch_size=patch, labels=labels,
                                    num_classes=int(config.model.num_classes))

      new = jax.jit(lambda p, m, k, denoise=denoise, path=path: elbo.nelbo(
          denoise(p, m), x0, k, schedule=schedule, path=path, num_steps=args.mnist_strata,
          patch_size=patch, data="discrete8bit", data_variance=variance)["bpd"])
      # The old estimator's bits/dim: its diffusion term plus the same prior and decoder terms.
      rest = elbo.nelbo(lambda z, t: z, x0, jax.random.key(0), schedule=schedule, path=path,
                        num_steps=1, patch_size=patch, data="discrete8bit")
      rest = (rest["prior"] + rest["recon"]) / dims
      old = jax.jit(lambda p, m, k, denoise=denoise, path=path: old_diffusion_term(
          denoise(p, m), x0, k, schedule=schedule, path=path, num_steps=args.mnist_strata,
          patch_size=patch))
      start = time.monotonic()
      key = jax.random.key(7)  # the same key for both checkpoints: common random numbers
      per_step["new"][step] = np.asarray(new(params, model_state, key))
      per_step["old"][step] = np.asarray(old(params, model_state, key) / dims + rest)
      print(f"mnist {path_name} step {step}: {time.monotonic() - start:.0f} s", flush=True)
    row = {}
    for label, values in per_step.items():
      row[label] = {str(s): dict(zip(("bpd", "bpd_se"), elbo.mean_and_stderr(v)))
                    for s, v in values.items()}
      row[label]["paired"] = elbo.paired_difference(values[steps[0]], values[steps[1]])
      print(f"mnist {path_name} {label}: " + ", ".join(
          f"step {s} {row[label][str(s)]['bpd']:.3f} ± {row[label][str(s)]['bpd_se']:.3f}"
          for s in steps) + f"; difference {row[label]['paired']['diff']:.3f} ± "
          f"{row[label]['paired']['diff_se']:.3f} (unpaired ± "
          f"{row[label]['paired']['diff_se_unpaired']:.3f})", flush=True)
    out[path_name] = row
  return out


def main(argv=None) -> dict[str, Any]:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  results: dict[str, Any] = {
      "command": "python benchmarks/elbo_variance.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "environment": {"platform": jax.default_backend(), "host": platform.machine(),
                      "cpu_count": os.cpu_count(), "jax": jax.__version__,
                      "note": "CPU shared with other jobs: timings are indicative only"},
      "settings": vars(args),
  }
  if args.cases:
    results["gaussian"] = part_gaussian(args)
  if args.mnist_workdir:
    results["mnist"] = part_mnist(args)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
  return results


if __name__ == "__main__":
  main()
