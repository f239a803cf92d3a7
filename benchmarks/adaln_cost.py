"""The cost of per-token adaLN: scalar-level DiT vs naive per-token vs distinct-level slots.

Per-token adaLN computes each block's 6d×d modulation for every token (~1.5× DiT's FLOPs when
done densely). The slot path (asyncpatch_jax/models/slots.py) computes it once per distinct level
of each example and gathers it back: the same function. This script measures, for one DiT size
(default DiT-S/2 on 32×32×4 latents, batch 32, 1000 classes):

  - FLOPs from XLA's cost analysis of each compiled forward pass: the scalar-level DiT (t: [B]),
    the dense per-token path, and the slot path on its own (the branch the model runs when every
    example fits in K slots);
  - wall time of the model as used (`deterministic=True`: slot path with dense fallback) on level
    maps with 1 (homogeneous), 2 (inpainting: known tokens at 0), 4 and 8 distinct levels, and on
    i.i.d. random levels (fallback), against the scalar-level DiT and the naive dense path.

    python benchmarks/adaln_cost.py                       # writes results/adaln_cost.json
    python benchmarks/adaln_cost.py --size B --batch 8 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import get_schedule


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="S", choices=sorted(models.DIT_SIZES))
  parser.add_argument("--patch", type=int, default=2)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--slots", type=int, default=8, help="K, the model's level_slots")
  parser.add_argument("--reps", type=int, default=3, help="timed calls per case (after warm-up)")
  parser.add_argument("--out", default="results/adaln_cost.json")
  return parser.parse_args(argv)


def build(args, level_slots: int) -> nnx.Module:
  config = models.default_config()
  config.update(name="dit", dit_size=args.size, dit_patch=args.patch, uncertainty=True,
                num_classes=args.num_classes, level_slots=level_slots)
  return models.get_model(config, data_shape=(args.image_size, args.image_size, args.channels),
                          level_patch_size=args.patch, schedule=get_schedule("cosine"),
                          rngs=nnx.Rngs(0))


def level_maps(batch: int, grid: int, seed: int = 0) -> dict[str, jax.Array]:
  """Level maps `[B, grid, grid]` with a controlled number of distinct levels per example."""
  rng = np.random.default_rng(seed)
  t_bar = rng.uniform(0.05, 0.95, (batch, 1, 1))

  def with_levels(k: int) -> np.ndarray:
    levels = np.sort(rng.uniform(0.0, 1.0, (batch, k)), axis=1)
    if k >= 2:
      levels[:, 0] = 0.0  # known tokens
    choice = np.concatenate([np.arange(k), rng.integers(0, k, grid * grid - k)])
    choice = np.stack([rng.permutation(choice) for _ in range(batch)])
    return np.take_along_axis(levels, choice, axis=1).reshape(batch, grid, grid)

  return {
      "homogeneous (1 level)": np.broadcast_to(t_bar, (batch, grid, grid)),
      "inpainting (2 levels)": with_levels(2),
      "staircase (4 levels)": with_levels(4),
      "8 levels": with_levels(8),
      "iid random (fallback)": rng.uniform(0.0, 1.0, (batch, grid, grid)),
  }


def flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  return float(analysis["flops"])


def wall_times(cases: dict[str, tuple], reps: int) -> dict[str, dict[str, float]]:
  """Times `fn(*args)` for every case, round-robin (so drifting load on a shared machine hits
  every case alike); min and median over `reps` rounds, after one warm-up call each."""
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in cases}
  for _ in range(reps):
    for name, (fn, args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: {"median_s": statistics.median(ts), "min_s": min(ts)}
          for name, ts in times.items()}


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Random weights (the zero-initialised adaLN would make every path trivially equal) shared by
  # the slot-path model and the dense-only one.
  graph_fast, params, rest = nnx.split(build(args, args.slots), nnx.Param, ...)
  graph_dense = nnx.split(nnx.eval_shape(lambda: build(args, 0)))[0]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])) if x.ndim >= 2 else
      rng.normal(size=x.shape) * 0.1, x.dtype), params)
  state_fast = state_dense = nnx.merge_state(params, rest)
  grid = args.image_size // args.patch
  key = jax.random.key(1)
  z = jax.random.normal(key, (args.batch, args.image_size, args.image_size, args.channels))
  labels = jax.random.randint(key, (args.batch,), 0, args.num_classes)
  maps = {k: jnp.asarray(v, jnp.float32) for k, v in level_maps(args.batch, grid).items()}
  t_scalar = maps["homogeneous (1 level)"][:, 0, 0]

  def run(graphdef):
    def forward(state, z, t, labels):
      return nnx.merge(graphdef, state)(z, t, labels).output
    return forward

  def slot_branch(state, z, t, labels):
    model = nnx.merge(graph_fast, state)
    y = model.class_embed(labels)[:, None]
    slots = models.find_level_slots(model.token_levels(t), model.level_slots)
    return model.forward_tokens(z, model.slot_conditioning(slots, y))

  forward_fast, forward_dense = jax.jit(run(graph_fast)), jax.jit(run(graph_dense))
  hom = maps["homogeneous (1 level)"]
  print(f"DiT-{args.size}/{args.patch}, {args.image_size}x{args.image_size}x{args.channels}, "
        f"batch {args.batch}, K = {args.slots}, {jax.devices()[0].platform} "
        f"({os.cpu_count()} host CPUs)", flush=True)
  counted = {
      "scalar-level DiT (t: [B])": flops(run(graph_dense), state_dense, z, t_scalar, labels),
      "per-token, naive dense": flops(run(graph_dense), state_dense, z, hom, labels),
      f"per-token, slot path (K={args.slots})": flops(slot_branch, state_fast, z, hom, labels),
  }
  base = counted["scalar-level DiT (t: [B])"]
  print(f"\n{'FLOPs per forward (XLA cost analysis)':44s} {'GFLOP':>9s} {'vs scalar':>10s}")
  for name, value in counted.items():
    print(f"{name:44s} {value / 1e9:9.2f} {value / base:9.3f}x")

  print(f"\n{'wall time (s)':44s} {'median':>9s} {'min':>9s} {'vs scalar':>10s}")
  cases = {
      "scalar-level DiT (t: [B])": (forward_dense, (state_dense, z, t_scalar, labels)),
      "per-token, naive dense: homogeneous": (forward_dense, (state_dense, z, hom, labels)),
  }
  for name, t in maps.items():
    cases[f"per-token, slots: {name}"] = (forward_fast, (state_fast, z, t, labels))
  timed = wall_times(cases, args.reps)
  base_t = timed["scalar-level DiT (t: [B])"]["min_s"]
  for name, r in timed.items():
    print(f"{name:44s} {r['median_s']:9.3f} {r['min_s']:9.3f} {r['min_s'] / base_t:9.3f}x")

  # Sanity: the slot path computes the same function as the dense path.
  max_err = max(float(jnp.abs(forward_fast(state_fast, z, t, labels)
                              - forward_dense(state_dense, z, t, labels)).max())
                for t in maps.values())
  print(f"\nmax |slots − dense| over all maps: {max_err:.2e}")
  result = {
      "model": f"DiT-{args.size}/{args.patch}",
      "data_shape": [args.image_size, args.image_size, args.channels],
      "batch": args.batch, "num_classes": args.num_classes, "level_slots": args.slots,
      "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
      "host": platform.processor() or platform.machine(), "host_cpus": os.cpu_count(),
      "jax": jax.__version__, "flops": counted, "flops_vs_scalar":
          {k: v / base for k, v in counted.items()},
      "wall_time": timed, "wall_time_vs_scalar": {k: v["min_s"] / base_t
                                                  for k, v in timed.items()},
      "max_abs_diff_slots_vs_dense": max_err,
  }
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
