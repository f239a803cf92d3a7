"""The cost of per-token adaLN: scalar-level DiT vs naive per-token vs distinct-level slots.

Per-token adaLN computes each block's 6d×d modulation for every token (~1.5× DiT's FLOPs when
done densely). The slot path (asyncpatch_jax/models/slots.py) computes it once per distinct level
of each example and gathers it back: the same function. This script measures, for one DiT size
(default DiT-S/2 on 32×32×4 latents, batch 32, 1000 classes):

  - FLOPs from XLA's cost analysis of each compiled forward pass: the scalar-level DiT (t: [B]),
    the dense per-token path, and the slot path on its own (the branch the model runs when every
    example fits in K slots);
  - wall time of the model as used (`deterministic=True`, which picks the cheapest exact path: the
    scalar-level network for homogeneous maps, slots for at most K levels per example, else
    dense) on maps with 1 (homogeneous), 2 (inpainting: known tokens at 0), 4 and 8 distinct
    levels and on i.i.d. random levels, against the scalar-level DiT and the naive dense path.

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

from asyncpatch_jax import models, user_errors
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
  parser.add_argument("--unet_flops", action="store_true",
                      help="also count the FLOPs of the paper's U-Net's spatial FiLM paths")
  return parser.parse_args(argv)


def build(args, level_slots: int) -> nnx.Module:
  config = models.default_config()
  config.update(name="dit", dit=dict(size=args.size, patch=args.patch), uncertainty=True,
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

  return {  # name: the path the model takes with K = 8
      "homogeneous -> scalar path": np.broadcast_to(t_bar, (batch, grid, grid)),
      "2 levels (inpainting) -> slots": with_levels(2),
      "4 levels -> slots": with_levels(4),
      "8 levels -> slots": with_levels(8),
      "iid random -> dense": rng.uniform(0.0, 1.0, (batch, grid, grid)),
  }


def flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  return float(analysis["flops"])


def wall_times(cases: dict[str, tuple], reps: int) -> dict[str, dict[str, float]]:
  """Times `fn(*args)` for every case, round-robin (so drifting load on a shared machine hits
  every case alike), after one warm-up call each. Wall time (min and median over `reps`) and the
  process's CPU time (all threads; median), which is less sensitive to other jobs' load."""
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  wall = {name: [] for name in cases}
  cpu = {name: [] for name in cases}
  for _ in range(reps):
    for name, (fn, args) in cases.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: {"median_s": statistics.median(wall[name]), "min_s": min(wall[name]),
                 "cpu_median_s": statistics.median(cpu[name])} for name in cases}


def unet_flops(image_size: int = 32, channels: int = 3) -> dict[str, float]:
  """FLOPs per example of a CIFAR-size U-Net (ADM: 128 channels, ×(1, 2, 2, 2), 2 blocks,
  attention at 16): scalar levels vs per-token FiLM (dense, slots) at level patches 1 and 4.

  Counted on the abstract model (`nnx.eval_shape`), so nothing is initialised.
  """
  config = models.default_config()
  config.update(name="unet", level_slots=8,
                unet=dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                          attention_resolutions=(16,)))
  z = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  counted = {}
  for p in (1, 4):
    model = nnx.eval_shape(lambda p=p: models.get_model(
        config, data_shape=(image_size, image_size, channels), level_patch_size=p,
        schedule=get_schedule("cosine"), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    t = jax.ShapeDtypeStruct((1, image_size // p, image_size // p), jnp.float32)

    def path(kind, state, z, t, graphdef=graphdef):
      m = nnx.merge(graphdef, state)
      if kind == "scalar":
        conds = m.scalar_conditions(t[:, 0, 0], None)
      elif kind == "dense":
        conds = m.dense_conditions(t, None)
      else:
        conds = m.slot_conditions(t, models.find_level_slots(t.reshape(1, -1), 8), None)
      return m.forward(z, conds, True)

    if p == 1:
      counted["U-Net, scalar levels"] = flops(lambda *a: path("scalar", *a), state, z, t)
    counted[f"U-Net, per-token FiLM, p={p}, dense"] = flops(lambda *a: path("dense", *a),
                                                            state, z, t)
    counted[f"U-Net, per-token FiLM, p={p}, slots (K=8)"] = flops(lambda *a: path("slots", *a),
                                                                  state, z, t)
  base = counted["U-Net, scalar levels"]
  print(f"\n{'U-Net FLOPs per example (XLA cost analysis)':50s} {'GFLOP':>9s} {'vs scalar':>10s}")
  for name, value in counted.items():
    print(f"{name:50s} {value / 1e9:9.2f} {value / base:9.3f}x")
  return counted


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
  hom = maps["homogeneous -> scalar path"]
  t_scalar = hom[:, 0, 0]

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
  print(f"DiT-{args.size}/{args.patch}, {args.image_size}x{args.image_size}x{args.channels}, "
        f"batch {args.batch}, K = {args.slots}, {jax.devices()[0].platform} "
        f"({os.cpu_count()} host CPUs)", flush=True)
  counted = {
      "scalar-level DiT (t: [B])": flops(run(graph_dense), state_dense, z, t_scalar, labels),
      "per-token, naive dense": flops(run(graph_dense), state_dense, z, hom, labels),
      f"per-token, slot path (K={args.slots})": flops(slot_branch, state_fast, z, hom, labels),
  }
  base = counted["scalar-level DiT (t: [B])"]
  print(f"\n{'FLOPs per forward (XLA cost analysis)':50s} {'GFLOP':>9s} {'vs scalar':>10s}")
  for name, value in counted.items():
    print(f"{name:50s} {value / 1e9:9.2f} {value / base:9.3f}x")

  print(f"\n{'time per forward (s)':50s} {'wall med':>9s} {'wall min':>9s} {'CPU med':>9s} "
        f"{'wall min':>9s} {'CPU':>7s}")
  print(f"{'':50s} {'':9s} {'':9s} {'':9s} {'vs scalar':>9s} {'vs sc.':>7s}")
  cases = {
      "scalar-level DiT (t: [B])": (forward_dense, (state_dense, z, t_scalar, labels)),
      "per-token, naive dense: homogeneous": (forward_dense, (state_dense, z, hom, labels)),
  }
  for name, t in maps.items():
    cases[f"per-token model: {name}"] = (forward_fast, (state_fast, z, t, labels))
  timed = wall_times(cases, args.reps)
  base_t = timed["scalar-level DiT (t: [B])"]
  for name, r in timed.items():
    wall_ratio = r["min_s"] / base_t["min_s"]
    cpu_ratio = r["cpu_median_s"] / base_t["cpu_median_s"]
    print(f"{name:50s} {r['median_s']:9.3f} {r['min_s']:9.3f} {r['cpu_median_s']:9.3f} "
          f"{wall_ratio:8.3f}x {cpu_ratio:6.3f}x")

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
      "time": timed,
      "wall_min_vs_scalar": {k: v["min_s"] / base_t["min_s"] for k, v in timed.items()},
      "cpu_median_vs_scalar": {k: v["cpu_median_s"] / base_t["cpu_median_s"]
                               for k, v in timed.items()},
      "max_abs_diff_slots_vs_dense": max_err,
  }
  if args.unet_flops:
    counted_unet = unet_flops()
    result["unet_flops"] = counted_unet
    result["unet_flops_vs_scalar"] = {k: v / counted_unet["U-Net, scalar levels"]
                                      for k, v in counted_unet.items()}
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  with user_errors.clean_exit():
    main(sys.argv[1:])
