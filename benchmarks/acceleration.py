"""Acceleration and autoregressive generation: does the uncertainty-guided plan save NFE?

Two parts, each writing its own results file (atomically, after every row, so an interrupted
run keeps what it measured):

- `--part gaussian` → `results/acceleration_gaussian.json`: the exact Gaussian posterior-mean
  denoiser (`sampling.analytic`; 16 correlated 1-D tokens, its variance is the exact posterior
  variance: a perfect uncertainty head), unconditional and inpainting with every other token
  known. At NFE budgets N, the relative errors of the sample covariance and mean against the
  exact (conditional) Gaussian, over several seeds (mean ± standard error), for the uniform plan
  and the fixed-budget uncertainty plan (`sampling.adaptive.BudgetPlan`), each with the last
  jump returning x̂0 or drawing from N(x̂0, v); and the smallest N at which each plan matches
  the uniform plan at 64 steps. Seconds on a CPU.
- `--part mnist` → `results/acceleration_mnist.json`: the MNIST recipe (reduced: see
  `--image_size`, `--train_steps`) trained twice with equal updates, with the default level
  sampler (which covers the sampling maps) and with the legacy one; FID (with bootstrap
  intervals over the samples) against NFE for the uniform, uncertainty and autoregressive plans,
  and uniform FID of both networks. Training is resumable: re-running picks up the checkpoints
  in `--workdir`; FID reuses `benchmarks/claims.py`'s bench.

    python benchmarks/acceleration.py --part gaussian
    nice python benchmarks/acceleration.py --part mnist --train_steps 1200 --train_minutes 18
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from asyncpatch_jax import file_io  # noqa: E402
from asyncpatch_jax.diffusion import level_samplers  # noqa: E402

RESULTS = os.path.join(ROOT, "results")


def log(message: str) -> None:
  stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
  print(f"[{stamp}] {message}", flush=True)


def write_json(path: str, data: dict[str, Any]) -> None:
  with file_io.atomic_open(path) as f:
    json.dump(data, f, indent=1, default=float)
    f.write("\n")


def environment() -> dict[str, Any]:
  return {"cpu_count": os.cpu_count(), "devices": str(jax.devices()), "jax": jax.__version__,
          "load_average": os.getloadavg(),
          "note": "a 2-core CPU shared with other jobs: timings are not comparable; NFE and "
                  "errors are"}


# ------------------------------------------------------------------------------------------------
# The exact Gaussian denoiser.

GAUSSIAN_PLANS = {
    "uniform": dict(strategy="uniform"),
    "uniform + x0 draws": dict(strategy="uniform", x0_draw="every"),
    "uncertainty plan": dict(strategy="adaptive", rule="budget", x0_draw="every"),
    "uncertainty plan, x̂0": dict(strategy="adaptive", rule="budget"),
}


def gaussian_problem(num_tokens: int = 16) -> dict[str, Any]:
  """16 correlated 1-D tokens; the inpainting case knows every other token."""
  from asyncpatch_jax.diffusion import get_schedule
  from asyncpatch_jax.sampling import analytic

  schedule = get_schedule("cosine")
  mean = np.linspace(-0.5, 0.5, num_tokens)
  cov = analytic.smooth_covariance(num_tokens, length_scale=2.0, nugget=0.05)
  known_mask = np.arange(num_tokens) % 2 == 0
  values = np.linspace(1.0, -1.0, num_tokens)
  cond_mean, cond_cov = analytic.gaussian_conditional(mean, cov, known_mask, values)
  return {"schedule": schedule, "denoiser": analytic.GaussianDenoiser(mean, cov, schedule),
          "cases": {"unconditional": (None, mean, cov),
                    "inpainting (every other token known)": (known_mask, cond_mean, cond_cov)},
          "values": values, "num_tokens": num_tokens}


def gaussian_errors(problem: dict[str, Any], case: str, kwargs: dict[str, Any], budget: int,
                    seeds: int, num_samples: int) -> dict[str, Any]:
  """Relative covariance and mean errors of `num_samples` samples per seed (mean ± s.e.)."""
  import functools

  import jax.numpy as jnp

  from asyncpatch_jax.sampling import sample

  known_mask, mean, cov = problem["cases"][case]
  d = problem["num_tokens"]
  extra = {}
  if known_mask is not None:
    extra = dict(known=jnp.asarray(problem["values"], jnp.float32).reshape(1, d, 1),
                 known_mask=known_mask[None])
  fn = jax.jit(functools.partial(sample, problem["denoiser"], x_shape=(num_samples, d, 1),
                                 schedule=problem["schedule"], num_steps=budget, **kwargs,
                                 **extra))
  cov_err, mean_err, nfe = [], [], []
  for seed in range(seeds):
    x, info = fn(jax.random.key(seed))
    x = np.asarray(x, np.float64).reshape(num_samples, d)
    if known_mask is not None:
      x = x[:, ~known_mask]
    cov_err.append(np.linalg.norm(np.cov(x.T) - cov) / np.linalg.norm(cov))
    mean_err.append(np.linalg.norm(x.mean(0) - mean) / np.sqrt(np.trace(cov)))
    nfe.append(int(info["nfe"]))

  def stat(v):
    return float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(len(v)))

  (c, c_se), (m, m_se) = stat(cov_err), stat(mean_err)
  return {"budget": budget, "nfe": float(np.mean(nfe)), "cov_error": c, "cov_error_se": c_se,
          "mean_error": m, "mean_error_se": m_se, "seeds": seeds, "num_samples": num_samples}


def matching_budget(rows: list[dict[str, Any]], target: dict[str, Any]) -> int | None:
  """The smallest NFE whose covariance error is within 2 s.e. of `target`'s (or below)."""
  for r in sorted(rows, key=lambda r: r["nfe"]):
    if r["cov_error"] <= target["cov_error"] + 2 * math.hypot(r["cov_error_se"],
                                                                target["cov_error_se"]):
      return int(r["nfe"])
  return None


def run_gaussian(args: argparse.Namespace) -> None:
  path = os.path.join(RESULTS, "acceleration_gaussian.json")
  problem = gaussian_problem()
  budgets = (4, 8) if args.quick else (4, 8, 16, 32, 64)
  seeds, num = (2, 500) if args.quick else (args.seeds, args.num_samples)
  results: dict[str, Any] = {
      "command": "python benchmarks/acceleration.py " + " ".join(sys.argv[1:]),
      "environment": environment(),
      "setup": {"tokens": problem["num_tokens"], "covariance": "squared-exponential, length 2, "
                "nugget 0.05", "schedule": "cosine", "update": "ancestral",
                "errors": "‖Ĉ − C‖_F / ‖C‖_F and ‖μ̂ − μ‖ / √tr C of the samples against the exact "
                          "(conditional) Gaussian; mean ± s.e. over seeds",
                "sampling_floor": "the covariance error of exact samples is about "
                                  f"{math.sqrt(2 / num):.3f} at {num} samples"},
      "plans": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in GAUSSIAN_PLANS.items()},
      "cases": {}, "status": "running"}
  for case in problem["cases"]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, kwargs in GAUSSIAN_PLANS.items():
      rows[name] = []
      for budget in budgets:
        row = gaussian_errors(problem, case, kwargs, budget, seeds, num)
        rows[name].append(row)
        log(f"{case} / {name} / N={budget}: NFE {row['nfe']:.0f}, covariance error "
            f"{row['cov_error']:.3f} ± {row['cov_error_se']:.3f}, mean error "
            f"{row['mean_error']:.3f} ± {row['mean_error_se']:.3f}")
        results["cases"][case] = {"rows": rows}
        write_json(path, results)
    summary = {}
    uniform = {r["budget"]: r for r in rows["uniform"]}
    for name in ("uncertainty plan", "uniform + x0 draws"):
      by_budget = {r["budget"]: r for r in rows[name]}
      summary[name] = {
          "no_worse_than_uniform_at_equal_nfe": {
              str(b): bool(by_budget[b]["cov_error"] <= uniform[b]["cov_error"] + 2 * math.hypot(
                  by_budget[b]["cov_error_se"], uniform[b]["cov_error_se"])
                  and by_budget[b]["mean_error"] <= uniform[b]["mean_error"] + 2 * math.hypot(
                  by_budget[b]["mean_error_se"], uniform[b]["mean_error_se"]))
              for b in budgets if b in by_budget and b in uniform},
      }
      if max(budgets) in uniform:
        need = matching_budget(rows[name], uniform[max(budgets)])
        summary[name]["nfe_to_match_uniform_at_" + str(max(budgets))] = need
        summary[name]["saving"] = (max(budgets) / need) if need else None
    results["cases"][case]["summary"] = summary
    write_json(path, results)
  results["status"] = "finished " + datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
  write_json(path, results)
  plot_gaussian(results, os.path.join(args.figures, "acceleration_gaussian.png"))


def plot_gaussian(results: dict[str, Any], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cases = list(results["cases"])
  fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.2), squeeze=False)
  for ax, case in zip(axes[0], cases):
    for name, rows in results["cases"][case]["rows"].items():
      rows = sorted(rows, key=lambda r: r["nfe"])
      ax.errorbar([r["nfe"] for r in rows], [r["cov_error"] for r in rows],
                  yerr=[2 * r["cov_error_se"] for r in rows], marker="o", capsize=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="relative covariance error",
           title=f"exact Gaussian denoiser: {case}")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Trained networks (MNIST).

NETWORKS = {"mixture": level_samplers.default_config, "legacy": level_samplers.legacy_config}


def claims_args(args: argparse.Namespace) -> argparse.Namespace:
  """`benchmarks/claims.py`'s settings for this part (its config, bench and store read them)."""
  from benchmarks import claims

  argv = ["--workdir", args.workdir, "--out", args.figures, "--claims", "mnist=5",
          "--nfe_budgets", "5,8,12,25,50", "--curve_points", "1", "--seed", str(args.seed)]
  for name in ("image_size", "batch_size", "train_steps", "train_minutes", "num_ref", "num_fid",
               "batch", "features", "bootstrap"):
    argv += [f"--{name}", str(getattr(args, name))]
  return claims.parse_args(argv + (["--quick"] if args.quick else []))


def train(name: str, args: argparse.Namespace, cargs: argparse.Namespace) -> Any:
  """Trains (resuming) the MNIST network with level sampler `name`; returns claims' Network
  (`cargs`: `claims_args(args)`)."""
  from asyncpatch_jax.train import restore as restore_lib
  from asyncpatch_jax.train import trainer
  from benchmarks import claims

  config = claims.make_config("mnist", "asyncpatch", cargs, args.train_steps)
  with config.unlocked():
    config.diffusion.level_sampler = NETWORKS[name]()
    config.checkpoint.every_steps = max(50, args.train_steps // 10)  # resumable
  # Named by the settings that matter here (not the full config's hash, which changes whenever
  # a field is added to the base config), so a re-run resumes or reuses the trained network.
  workdir = os.path.join(args.workdir, f"mnist-{name}-{args.image_size}px-b{args.batch_size}-"
                                       f"s{args.train_steps}-seed{args.seed}")
  log(f"{name}: training in {workdir} (cap {args.train_minutes} min, {args.train_steps} steps)")
  start = time.monotonic()
  trainer.train_and_evaluate(config, workdir)
  seconds = time.monotonic() - start
  _, _, setup, state, step = restore_lib.restore_latest(config, workdir)
  log(f"{name}: {int(step)} updates ({seconds:.0f} s this call)")
  params = state.ema[restore_lib.ema_params_name(config)]
  return claims.Network("mnist", name, config, setup, params, state.model_state, int(step),
                        seconds)


def mnist_rows(grid: tuple[int, ...]) -> list[tuple[str, str, dict[str, Any]]]:
  """(network, row name, `sample` keywords), the most informative first (rows are written as
  they finish): the three plans at N = 8 and 25, the legacy network's uniform FID, N = 12 and
  5, the ablations at N = 8 (which half of the uncertainty plan helps), then N = 50."""
  from benchmarks import claims

  def three(n):
    return [("mixture", f"uniform N={n}", dict(strategy="uniform", num_steps=n)),
            ("mixture", f"uncertainty N={n}", dict(strategy="adaptive", rule="budget",
                                                   num_steps=n, x0_draw="every")),
            ("mixture", f"autoregressive N={n}", claims.ar_kwargs(n, grid))]

  return [*three(8), *three(25),
          ("legacy", "uniform N=25", dict(strategy="uniform", num_steps=25)),
          ("legacy", "uniform N=8", dict(strategy="uniform", num_steps=8)),
          *three(12), *three(5),
          ("mixture", "uniform + x0 draws N=8", dict(strategy="uniform", num_steps=8,
                                                     x0_draw="every")),
          ("mixture", "budget plan, x̂0 N=8", dict(strategy="adaptive", rule="budget",
                                                  num_steps=8)),
          ("legacy", "autoregressive N=8", claims.ar_kwargs(8, grid)),
          *three(50)]


def run_mnist(args: argparse.Namespace) -> None:
  from asyncpatch_jax.evaluation import fid as fid_lib
  from benchmarks import claims

  path = os.path.join(RESULTS, "acceleration_mnist.json")
  cargs = claims_args(args)
  networks = {name: train(name, args, cargs) for name in NETWORKS}
  extractor = (fid_lib.FeatureExtractor(batch_size=args.batch) if args.features == "inception"
               else claims.AlexNetFeatures())
  bench = claims.DatasetBench("mnist", networks, cargs, extractor, None, claims.Store(cargs))
  command = "python benchmarks/acceleration.py " + " ".join(sys.argv[1:])
  results: dict[str, Any] = {
      "command": command, "environment": environment(),
      "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      "settings": {"image_size": args.image_size, "token_grid": list(bench.grid),
                   "batch_size": args.batch_size, "num_fid": args.num_fid,
                   "num_ref": args.num_ref, "bootstrap": args.bootstrap,
                   "features": claims.FEATURE_NAMES[args.features],
                   "cfg_scale": bench.cfg_scale},
      "networks": {n: {"updates": net.steps, "level_sampler": net.config.diffusion.level_sampler
                       .to_dict()} for n, net in networks.items()},
      "rows": {}, "status": "running"}
  for network, name, kwargs in mnist_rows(tuple(bench.grid)):
    row = claims.strip(bench.fid(network, name.replace(" ", "_"), **kwargs))
    row.update(network=network, kwargs={k: str(v) for k, v in kwargs.items()})
    results["rows"][f"{network}: {name}"] = row
    log(f"{network}: {name}: FID {row['fid']:.1f} [{row['fid_lo']:.1f}, {row['fid_hi']:.1f}] "
        f"at NFE {row['nfe']:.0f}")
    write_json(path, results)
    plot_mnist(results, os.path.join(args.figures, "acceleration_mnist.png"))
  results["status"] = "finished " + datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
  write_json(path, results)


def plot_mnist(results: dict[str, Any], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
  for name, row in results["rows"].items():
    label = name.rsplit(" N=", 1)[0]
    series.setdefault(label, []).append((row["nfe"], row))
  for label, points in series.items():
    if len(points) < 2:
      continue
    points.sort(key=lambda p: p[0])
    nfe = [p[0] for p in points]
    fid = [p[1]["fid"] for p in points]
    err = [[p[1]["fid"] - min(p[1]["fid"], p[1]["fid_lo"]) for p in points],
           [p[1]["fid_hi"] - p[1]["fid"] for p in points]]
    ax.errorbar(nfe, fid, yerr=err, marker="o", capsize=3, label=label)
  for name, row in results["rows"].items():
    if len(series[name.rsplit(" N=", 1)[0]]) < 2:
      ax.errorbar([row["nfe"]], [row["fid"]], yerr=[[0], [row["fid_hi"] - row["fid"]]],
                  marker="s", linestyle="none", capsize=3, label=name)
  ax.set(xscale="log", xlabel="NFE", ylabel="FID (AlexNet features, see README)",
         title="MNIST 16×16, 1200 updates: FID against NFE")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def redraw(args: argparse.Namespace) -> None:
  """Redraws both plots from the results files that exist."""
  for part, plot in (("gaussian", plot_gaussian), ("mnist", plot_mnist)):
    path = os.path.join(RESULTS, f"acceleration_{part}.json")
    if os.path.exists(path):
      with open(path) as f:
        plot(json.load(f), os.path.join(args.figures, f"acceleration_{part}.png"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--part", choices=("gaussian", "mnist", "train", "plots"), required=True,
                 help="'train' only trains the MNIST networks (for a background run); 'plots' "
                      "redraws the plots from the results files")
  p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="/tmp/asyncpatch_acceleration")
  p.add_argument("--figures", default=os.path.join(ROOT, "docs", "figures"))
  p.add_argument("--image_size", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--train_steps", type=int, default=1200)
  p.add_argument("--train_minutes", type=float, default=18.0)
  p.add_argument("--num_ref", type=int, default=500)
  p.add_argument("--num_fid", type=int, default=500)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--features", choices=("inception", "alexnet"), default="alexnet",
                 help="FID features: Inception is too slow for the shared 2-core CPU")
  p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per FID")
  p.add_argument("--seeds", type=int, default=3, help="Gaussian part: seeds per plan")
  p.add_argument("--num_samples", type=int, default=4000, help="Gaussian part: per seed")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  if args.part == "train":
    for name in NETWORKS:
      train(name, args)
  elif args.part == "mnist":
    run_mnist(args)
  elif args.part == "plots":
    redraw(args)
  else:
    run_gaussian(args)


if __name__ == "__main__":
  main()
