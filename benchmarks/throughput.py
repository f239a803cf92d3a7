"""Throughput, compile time, memory and FLOPs of the real train step and sampler (issue 9).

On whatever backend JAX runs on, for one network (U-Net or DiT) this measures:

  - the train step of `asyncpatch_jax/train/step.py` (built from `configs.base.get_config()` with
    overrides, jitted and donated as the trainer does): compile time, images/s, FLOPs per step
    from the model's analytic count (DiT) and XLA's cost analysis, and MFU against the device's
    bf16 peak (`asyncpatch_jax/train/perf.py`'s table, or `--peak_tflops`; none on CPUs);
  - the cost of asynchrony: the same train step with the recipe's per-token level maps vs
    homogeneous maps (the level sampler 'homogeneous'), and the network's forward and
    forward+backward with a per-token map `[B, h, w]` vs one level per image `[B]`;
  - the whole sampling loop (`asyncpatch_jax.sampling.sample`, uniform plan, `make_denoiser`)
    as one compiled program: compile time, images/s, NFE/s and its overhead over bare forward
    passes;
  - peak memory (device `memory_stats()` where available, else the process's max RSS);
  - optionally (`--torch`) the official PyTorch DiT's train step (`benchmarks/torch_dit.py`) on
    the same batch on the CPU, in its own worker process, float32 (DiT's setting) and with
    `--torch_bf16` also under bf16 autocast, and the ratios of images/s;
  - the compile time of the train step of a narrow DiT at depth 12 and 28, blocks unrolled vs
    `model.dit.scan_layers` (part `scan_compile`).

The speed options of the networks are flags: `--dtype bfloat16`, `--remat`, `--scan_layers`,
`--attention_impl`, and the architecture option `--adaln single`. On Linux the script re-runs
itself with glibc's transparent-huge-page tunable (`with_huge_pages`). On an accelerator, e.g.
DiT-B/2 on 256×256 images' latents (32×32×4):

    python benchmarks/throughput.py --model dit --dit_size B --dit_patch 2 --image_size 32 \
        --channels 4 --batch 256 --dtype bfloat16 --steps 10 --skip scan_compile

Wall time and process CPU time (`time.process_time`, all threads) are both recorded: on a shared,
loaded machine wall time depends on other jobs; CPU time much less so. Results are added to
`results/throughput_<backend>.json` (one entry per configuration, written atomically) and printed
as a markdown table.

    python benchmarks/throughput.py --model dit --dit_size S --dit_patch 2 --image_size 32 \
        --channels 4 --batch 32 --steps 3 --dtype bfloat16 --adaln single --torch --torch_bf16
    python benchmarks/throughput.py --model unet --image_size 32 --channels 3 --batch 32
    python benchmarks/throughput.py --quick --out /tmp/t.json     # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncpatch_jax import data as data_lib
from asyncpatch_jax import diffusion, file_io, models, sampling, user_errors
from asyncpatch_jax.train import builders, perf
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib
from configs import base

PARTS = ("train", "asynchrony", "sampling", "scan_compile")
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="dit", choices=("dit", "unet"))
  parser.add_argument("--dit_size", default="S", choices=sorted(models.DIT_SIZES))
  parser.add_argument("--dit_patch", type=int, default=2)
  parser.add_argument("--level_patch", type=int, default=0,
                      help="level-map token size (0: the DiT patch, 1 for the U-Net)")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=4)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3, help="timed calls per case after warm-up")
  parser.add_argument("--sample_steps", type=int, default=16, help="sampler steps (NFE)")
  parser.add_argument("--sample_plans", default="adaptive,autoregressive",
                      help="plans timed besides 'uniform' in the sampling part (comma list; "
                      "'adaptive' switches on the uncertainty head)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--remat", default="", help="model.remat ('' off, 'full', "
                      "'dots_saveable', 'dots_with_no_batch_dims_saveable')")
  parser.add_argument("--scan_layers", action="store_true", help="model.dit.scan_layers")
  parser.add_argument("--adaln", default="block", choices=("block", "single"),
                      help="model.dit.adaln: 'block' = DiT's, 'single' = PixArt-α's adaLN-single")
  parser.add_argument("--attention_impl", default=None, choices=(None, "xla", "cudnn"),
                      help="jax.nn.dot_product_attention implementation (default: JAX picks)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="the device's peak TFLOP/s for MFU (0: train/perf.py's table)")
  parser.add_argument("--torch", action="store_true",
                      help="also time the official PyTorch DiT's train step (CPU) side by side")
  parser.add_argument("--torch_bf16", action="store_true",
                      help="with --torch, also time it under torch.autocast(bfloat16)")
  parser.add_argument("--skip", default="", help=f"comma list of parts to skip: {PARTS}")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
  parser.add_argument("--small_pages", action="store_true",
                      help="don't re-run with glibc's huge-page tunable (see with_huge_pages)")
  parser.add_argument("--out", default="", help="JSON path (default results/throughput_<backend>"
                      ".json)")
  return parser.parse_args(argv)


def make_config(args, level_sampler: str = "recipe") -> ml_collections.ConfigDict:
  """The training config: `configs.base` with this benchmark's overrides."""
  config = base.get_config("debug" if args.quick else None)
  with config.unlocked():
    model = config.model
    model.name = args.model
    model.dtype = args.dtype
    model.num_classes = args.num_classes
    model.unet.dropout = 0.0 if args.quick else model.unet.dropout
    model.remat = args.remat
    model.dit.scan_layers = bool(args.scan_layers and args.model == "dit")
    model.dit.adaln = args.adaln
    model.attention_impl = args.attention_impl
    if args.model == "dit":
      model.dit.size = args.dit_size
      model.dit.patch = args.dit_patch
    config.data.source = "synthetic"  # random batches of this shape: timing only
    config.data.image_size = args.image_size
    config.data.channels = args.channels
    config.data.num_classes = args.num_classes
    config.data.batch_size = args.batch
    config.diffusion.patch_size = level_patch(args)
    if level_sampler == "homogeneous":
      config.diffusion.level_sampler = ml_collections.ConfigDict({"name": "homogeneous"})
  return config


def level_patch(args) -> int:
  if args.level_patch:
    return args.level_patch
  return args.dit_patch if args.model == "dit" else 1


def log(message: str) -> None:
  print(f"[throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Measured(NamedTuple):
  """A call's own timing, for work done in another process (`TorchWorker`)."""

  wall_s: float
  cpu_s: float


def timed_in_blocks(fns: dict, reps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
  """Median/min wall seconds and median process CPU seconds of each `fns[name]()` (blocked):
  one function after the other, each `warmup` untimed calls then `reps` timed ones back to back.

  Not call-by-call alternation: on this machine a JAX step right after a PyTorch step (even one
  in another process) ran up to 2× slower, in CPU time too, and the next one was normal again;
  the warm-up call absorbs that. Compare on a quiet machine. A function returning `Measured`
  reports its own times."""
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for name, fn in fns.items():
    for _ in range(warmup):
      jax.block_until_ready(fn())
    for _ in range(reps):
      start, start_cpu = time.perf_counter(), time.process_time()
      out = jax.block_until_ready(fn())
      if isinstance(out, Measured):
        wall[name].append(out.wall_s)
        cpu[name].append(out.cpu_s)
        continue
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: {"wall_s": statistics.median(wall[name]), "wall_min_s": min(wall[name]),
                 "cpu_s": statistics.median(cpu[name])} for name in fns}


def timed(fn, reps: int, warmup: int = 1) -> dict[str, float]:
  return timed_in_blocks({"fn": fn}, reps, warmup)["fn"]


def compile_timed(jitted, *args, split: bool = False):
  """`(compiled, seconds to trace + lower + compile)`; with `split`, the seconds are
  `(lower_s, compile_s)`."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  end = time.perf_counter()
  return compiled, ((lowered_at - start, end - lowered_at) if split else end - start)


def peak_memory() -> dict[str, float | str]:
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_bytes": float(stats["peak_bytes_in_use"]), "source": "device memory_stats"}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
  return {"peak_bytes": rss, "source": "process max RSS"}


def prepare_train_step(config):
  """The real train step (state donated), compiled on a synthetic batch: `(run, info)` with
  `run()` one step and `info` its compile time and FLOP counts."""
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  tx = opt_lib.make_optimizer(config.optimizer, int(config.num_steps))
  setup = state_lib.setup_state(config, mesh, tx)
  state = setup.init(config)
  pipeline = data_lib.create_train_pipeline(config.data, batch_sharding)  # 'synthetic' data
  batch = next(pipeline)
  pipeline.close()
  jitted = step_lib.jit_train_step(step_lib.make_train_step(config, setup), setup,
                                   batch_sharding)
  compiled, (lower_s, xla_s) = compile_timed(jitted, state, batch, split=True)
  model = setup.model_def.merge(setup.abstract.params, setup.abstract.model_state)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics

  return run, {"compile_s": lower_s + xla_s, "lower_s": lower_s, "xla_compile_s": xla_s,
               "params": state_lib.num_params(state.params),
               "batch": int(config.data.batch_size),
               "model_flops_per_step": perf.model_train_flops(model,
                                                              int(config.data.batch_size)),
               "xla_flops_per_step": perf.compiled_flops(compiled)}


def train_result(info: dict, t: dict, peak: float | None) -> dict:
  """Images/s, TFLOP/s and MFU (model FLOPs where the network has an analytic count, else
  XLA's; one device)."""
  images = info["batch"]
  out = {**info, **t, "images_per_s": images / t["wall_s"],
         "images_per_cpu_s": images / t["cpu_s"] if t["cpu_s"] > 0 else None}
  flops = info["model_flops_per_step"] or info["xla_flops_per_step"]
  if flops:
    out["tflops_per_s"] = flops / t["wall_s"] / 1e12
    out["mfu"] = perf.mfu(flops, t["wall_s"], peak)
  return out


def build_model(config) -> nnx.Module:
  return builders.build_model(config, builders.model_rngs(builders.init_key(config)))


def asynchrony_cases(config, reps: int) -> dict:
  """Forward and forward+backward of one network: per-token map vs one level per image."""
  model = build_model(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  b, s, c = int(config.data.batch_size), int(config.data.image_size), int(config.data.channels)
  p = int(config.diffusion.patch_size)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((b, s, s, c)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, max(int(config.model.num_classes), 1), (b,)), jnp.int32)
  labels = labels if int(config.model.num_classes) > 0 else None
  t_map = jnp.asarray(rng.uniform(0.0, 1.0, (b, s // p, s // p)), jnp.float32)
  t_hom = jnp.broadcast_to(t_map[:, :1, :1], t_map.shape)
  t_scalar = t_map[:, 0, 0]

  def forward(params, t, deterministic):
    # Fresh RNG variables inside the trace (dropout mutates them), as the train step does.
    m = nnx.merge(graphdef, params, jax.tree.map(jnp.array, rest))
    return m(z, t, labels, deterministic=deterministic).output

  def loss(params, t):
    return jnp.mean(jnp.square(forward(params, t, False).astype(jnp.float32) - z))

  grad = jax.grad(loss)
  cases = {
      "forward, per-token map (dense)": (functools.partial(forward, deterministic=False),
                                         t_map),
      "forward, homogeneous map (eval: scalar path)": (
          functools.partial(forward, deterministic=True), t_hom),
      "forward, one level per image [B]": (functools.partial(forward, deterministic=False),
                                           t_scalar),
      "fwd+bwd, per-token map": (grad, t_map),
      "fwd+bwd, one level per image [B]": (grad, t_scalar),
  }
  out = {}
  for name, (fn, t) in cases.items():
    compiled, compile_s = compile_timed(jax.jit(fn), params, t)
    out[name] = {"compile_s": compile_s, "flops": perf.compiled_flops(compiled),
                 **timed(lambda compiled=compiled, t=t: compiled(params, t), reps)}
    out[name]["images_per_s"] = b / out[name]["wall_s"]
  return out


def sampling_case(config, args, reps: int, forward_hom_s: float | None,
                  strategy: str = "uniform") -> dict:
  """The whole sampling loop of one plan as one compiled program (ancestral updates): time per
  image and per network evaluation, and the overhead over bare forward passes. 'adaptive' (the
  uncertainty-guided budget plan) needs the network's uncertainty head (`config.model`)."""
  model = build_model(config)
  split = nnx.split(model)
  b, s, c = int(config.data.batch_size), int(config.data.image_size), int(config.data.channels)
  schedule = builders.make_schedule(config.diffusion)
  num_classes = int(config.model.num_classes)
  labels = jnp.zeros((b,), jnp.int32) if num_classes > 0 else None

  patch = int(config.diffusion.patch_size)
  num_steps, kwargs = args.sample_steps, {}
  if strategy == "autoregressive":  # 2×2 groups of tokens (quadrants), half overlapping
    grid = diffusion.token_grid((1, s, s, c), patch)[1:]
    kwargs = dict(group_shape=tuple(max(1, g // 2) for g in grid), overlap=0.5,
                  steps_per_group=max(1, num_steps // 2))
    num_steps = None  # set by the plan: o_3 + S

  def run(state, rng):
    denoiser = models.make_denoiser(
        (split[0], state), schedule=schedule, parametrization=str(config.model.parametrization),
        patch_size=patch, labels=labels, num_classes=num_classes)
    return sampling.sample(denoiser, rng, (b, s, s, c), schedule=schedule, strategy=strategy,
                           num_steps=num_steps, patch_size=patch, **kwargs)

  rng = jax.random.key(0)
  compiled, compile_s = compile_timed(jax.jit(run), split[1], rng)
  _, info = compiled(split[1], rng)
  nfe = int(info["nfe"])
  t = timed(lambda: compiled(split[1], rng), reps)
  out = {"strategy": strategy, "compile_s": compile_s, "nfe": nfe, **t,
         "images_per_s": b / t["wall_s"], "nfe_per_s": nfe / t["wall_s"],
         "cpu_s_per_nfe": t["cpu_s"] / max(nfe, 1)}
  if forward_hom_s:
    out["overhead_vs_bare_forwards"] = t["wall_s"] / (nfe * forward_hom_s) - 1.0
  return out


class TorchWorker:
  """The official PyTorch DiT's train step (benchmarks/torch_dit.py) in a child process, one
  step per call. In this process, PyTorch's steps slowed the JAX step timed after each of them
  by 10-60% (its allocator's and OpenMP threads' after-effects); a child keeps them apart. The
  child's OpenMP threads sleep when idle (`OMP_WAIT_POLICY=PASSIVE`, which did not slow
  PyTorch's step here) so they do not spin on the cores our step runs on next; it runs with
  glibc's default page handling."""

  def __init__(self, args, autocast: bool = False):
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "torch_dit.py"),
               "--size", args.dit_size, "--patch", str(args.dit_patch),
               "--image_size", str(args.image_size), "--channels", str(args.channels),
               "--num_classes", str(args.num_classes), "--batch", str(args.batch)]
    command += ["--autocast"] * autocast + ["--tiny"] * args.quick
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # glibc's defaults for PyTorch: our huge-page tunable (`with_huge_pages`) slowed its step.
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != HUGE_PAGES]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env)
    self.info = self._reply()

  def _reply(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker exited (code {self.process.wait()}); run "
                         f"benchmarks/torch_dit.py by hand to see its error")
    return json.loads(line)

  def __call__(self) -> Measured:
    self.process.stdin.write("step\n")
    self.process.stdin.flush()
    reply = self._reply()
    return Measured(reply["wall_s"], reply["cpu_s"])

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.close()
      self.process.wait(timeout=60)


def prepare_torch(args, autocast: bool = False):
  """The PyTorch DiT's train step on the same batch size, float32 or under bf16 autocast, in a
  `TorchWorker`: `(run, info)`."""
  worker = TorchWorker(args, autocast)
  return worker, dict(worker.info)


def torch_result(args, info: dict, t: dict) -> dict:
  return {**t, "images_per_s": args.batch / t["wall_s"],
          "images_per_cpu_s": args.batch / t["cpu_s"] if t["cpu_s"] > 0 else None, **info}


def scan_compile_cases(args, depths=(12, 28)) -> dict:
  """Compile time of the train step for a narrow DiT (hidden 64, 2 heads) at each depth, blocks
  unrolled vs scanned: a scanned DiT compiles one block whatever its depth. A first, discarded
  compile warms JAX's and XLA's one-time start-up costs."""
  out = {}
  for depth in (depths[0], *depths):
    for scan in (False, True):
      config = make_config(args)
      with config.unlocked():
        config.model.name = "dit"
        config.model.dit.update(hidden_size=64, num_heads=2, depth=depth, scan_layers=scan)
        config.diffusion.patch_size = args.dit_patch
      log(f"compile: depth {depth}, {'scan' if scan else 'unrolled'}")
      _, info = prepare_train_step(config)
      out[f"depth {depth}, {'scan_layers' if scan else 'unrolled'}"] = {
          k: info[k] for k in ("compile_s", "lower_s", "xla_compile_s", "params")}
  return out


def write_json(path: str, key: str, entry: dict) -> None:
  """Adds `entry` under `key` to the JSON file at `path`, atomically (`file_io`)."""
  data = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError):
      data = {}
  data[key] = entry
  with file_io.atomic_open(path) as f:
    json.dump(data, f, indent=2, default=float)


def fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def table(entry: dict) -> str:
  rows = ["| case | images/s (wall) | wall s | CPU s | compile s | GFLOP | MFU |",
          "|---|---|---|---|---|---|---|"]

  def row(name, r):
    flops = r.get("model_flops_per_step") or r.get("xla_flops_per_step") or r.get("flops")
    rows.append(f"| {name} | {fmt(r.get('images_per_s'))} | {fmt(r['wall_s'], '.3f')} | "
                f"{fmt(r['cpu_s'], '.3f')} | {fmt(r.get('compile_s'), '.1f')} | "
                f"{fmt(None if flops is None else flops / 1e9, '.1f')} | "
                f"{fmt(r.get('mfu'), '.1%')} |")

  for name, r in entry.get("train", {}).items():
    row(f"train step, {name} level maps", r)
  for name, r in entry.get("asynchrony", {}).items():
    row(name, r)
  if "sampling" in entry:
    r = entry["sampling"]
    row(f"sampling loop ({r['nfe']} NFE; {r['nfe_per_s']:.2f} NFE/s)", r)
  for name, r in entry.get("sampling_plans", {}).items():
    row(f"sampling loop, {name} plan ({r['nfe']} NFE; {r['cpu_s_per_nfe']:.3f} CPU s/NFE)", r)
  for case in ("torch", "torch bf16"):
    if case in entry:
      row(f"PyTorch DiT train step ({entry[case]['precision']}, torch {entry[case]['torch']}, "
          f"own process)", entry[case])
  lines = rows
  if "scan_compile" in entry:
    lines += ["", "| train step of a DiT with hidden size 64 | trace + lower s | XLA compile s |",
              "|---|---|---|"]
    lines += [f"| {name} | {r['lower_s']:.1f} | {r['xla_compile_s']:.1f} |"
              for name, r in entry["scan_compile"].items()]
  for name, value in entry.get("summary", {}).items():
    lines.append(f"\n- {name}: {fmt(value, '.3f')}")
  lines.append(f"\n- peak memory: {entry['memory']['peak_bytes'] / 2**30:.2f} GiB "
               f"({entry['memory']['source']}); load average before / after: "
               f"{entry['load_avg'][0]:.1f} / {entry.get('load_avg_after', [0])[0]:.1f}")
  lines.append("- wall time depends on other jobs on a shared machine; CPU time is the process's "
               "(all threads), images/s use wall time")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.quick:
    # A batch of 8 splits over the tests' 8 fake CPU devices.
    args.image_size, args.batch, args.steps = 8, 8, 1
    args.sample_steps, args.num_classes = 2, 10
  skip = {w.strip() for w in args.skip.split(",") if w.strip()}
  backend = jax.default_backend()
  device = jax.devices()[0]
  peak = perf.peak_tflops(device, args.peak_tflops)
  name = ("dit-" + f"{args.dit_size}/{args.dit_patch}" if args.model == "dit" else "unet")
  if args.quick:
    name += "-quick"
  key = f"{name} {args.image_size}x{args.image_size}x{args.channels} b{args.batch} {args.dtype}"
  key += "".join(f" {flag}" for flag in (args.remat and f"remat={args.remat}",
                                         args.scan_layers and "scan_layers",
                                         args.attention_impl and f"attn={args.attention_impl}",
                                         args.adaln != "block" and f"adaln={args.adaln}")
                 if flag)
  out = args.out or os.path.join("results", f"throughput_{backend}.json")
  entry: dict = {"config": {k: v for k, v in vars(args).items()},
                 "backend": backend, "device_kind": device.device_kind,
                 "num_devices": jax.device_count(), "peak_tflops": peak,
                 "jax": jax.__version__, "python": platform.python_version(),
                 "cpu": perf.host_cpu(), "cpu_count": os.cpu_count(),
                 "load_avg": list(os.getloadavg()),
                 "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                 "note": "wall_s is wall-clock; cpu_s is time.process_time (all threads); the "
                         "machine may be shared"}
  if "train" not in skip:
    log("compiling the train step: per-token and homogeneous level maps")
    runs, infos = {}, {}
    for case, sampler in (("per-token (recipe)", "recipe"), ("homogeneous", "homogeneous")):
      runs[case], infos[case] = prepare_train_step(make_config(args, sampler))
    if args.torch:
      runs["torch"], infos["torch"] = prepare_torch(args)
    if args.torch and args.torch_bf16:
      runs["torch bf16"], infos["torch bf16"] = prepare_torch(args, autocast=True)
    log(f"timing {', '.join(runs)}: a warm-up step then {args.steps} timed steps each")
    try:
      times = timed_in_blocks(runs, args.steps)
    finally:
      for case in ("torch", "torch bf16"):
        if case in runs:
          runs[case].close()
    entry["train"] = {case: train_result(infos[case], times[case], peak)
                      for case in runs if not case.startswith("torch")}
    for case in ("torch", "torch bf16"):
      if case in runs:
        entry[case] = torch_result(args, infos[case], times[case])
    write_json(out, key, {**entry, "partial": True})
  forward_hom_s = None
  if "asynchrony" not in skip:
    log("forward and fwd+bwd: per-token map vs one level per image")
    entry["asynchrony"] = asynchrony_cases(make_config(args), args.steps)
    forward_hom_s = entry["asynchrony"]["forward, homogeneous map (eval: scalar path)"]["wall_s"]
    write_json(out, key, {**entry, "partial": True})
  if "sampling" not in skip:
    log(f"sampling loop ({args.sample_steps} steps)")
    entry["sampling"] = sampling_case(make_config(args), args, args.steps, forward_hom_s)
    plans = [w.strip() for w in args.sample_plans.split(",") if w.strip()]
    if plans:
      entry["sampling_plans"] = {}
    for plan in plans:
      log(f"sampling loop, {plan} plan (M = {args.sample_steps})")
      config = make_config(args)
      if plan == "adaptive":
        with config.unlocked():
          config.model.uncertainty = True
      entry["sampling_plans"][plan] = sampling_case(config, args, args.steps, forward_hom_s, plan)
  if "scan_compile" not in skip:
    depths = (2, 4) if args.quick else (12, 28)
    entry["scan_compile"] = scan_compile_cases(args, depths)
  summary = {}
  if "train" in entry:
    tr = entry["train"]
    summary["train: per-token / homogeneous wall time"] = (
        tr["per-token (recipe)"]["wall_s"] / tr["homogeneous"]["wall_s"])
  if "asynchrony" in entry:
    a = entry["asynchrony"]
    summary["forward: per-token map / [B] levels (wall)"] = (
        a["forward, per-token map (dense)"]["wall_s"]
        / a["forward, one level per image [B]"]["wall_s"])
    summary["fwd+bwd: per-token map / [B] levels (wall)"] = (
        a["fwd+bwd, per-token map"]["wall_s"] / a["fwd+bwd, one level per image [B]"]["wall_s"])
    summary["fwd+bwd: per-token map / [B] levels (FLOPs)"] = (
        (a["fwd+bwd, per-token map"]["flops"] or 0)
        / (a["fwd+bwd, one level per image [B]"]["flops"] or 1))
  if "sampling" in entry and "overhead_vs_bare_forwards" in entry["sampling"]:
    summary["sampling loop overhead vs bare forwards"] = (
        entry["sampling"]["overhead_vs_bare_forwards"])
  for plan, r in entry.get("sampling_plans", {}).items():
    summary[f"sampling, {plan} plan: CPU s per NFE / uniform's"] = (
        r["cpu_s_per_nfe"] / entry["sampling"]["cpu_s_per_nfe"])
  if "torch" in entry and "train" in entry:
    ours = entry["train"]["per-token (recipe)"]
    summary["ours / PyTorch DiT images/s (wall)"] = (ours["images_per_s"]
                                                    / entry["torch"]["images_per_s"])
    summary["ours / PyTorch DiT images per CPU-second"] = (
        ours["images_per_cpu_s"] / entry["torch"]["images_per_cpu_s"])
  if "torch bf16" in entry and "train" in entry:
    summary["ours / PyTorch DiT under bf16 autocast, images/s (wall)"] = (
        entry["train"]["per-token (recipe)"]["images_per_s"]
        / entry["torch bf16"]["images_per_s"])
  if "scan_compile" in entry:
    c = entry["scan_compile"]
    for kind in ("unrolled", "scan_layers"):
      summary[f"compile depth {depths[1]} / depth {depths[0]}, {kind}"] = (
          c[f"depth {depths[1]}, {kind}"]["compile_s"] / c[f"depth {depths[0]}, {kind}"]
          ["compile_s"])
  entry["summary"] = summary
  entry["memory"] = peak_memory()
  entry["load_avg_after"] = list(os.getloadavg())
  write_json(out, key, entry)
  print(f"\n### {key} on {backend} ({device.device_kind}), {args.steps} timed steps\n")
  print(table(entry))
  print(f"\nwrote {out}")
  return entry


def with_huge_pages(argv: list[str]) -> None:
  """Re-executes this script once with glibc's transparent-huge-page tunable (Linux).

  XLA:CPU allocates each call's temporaries afresh (GBs per DiT-S/2 train step at batch 32) and
  glibc maps them with 4 KiB pages: 1.5 M page faults per step here, ≈20% of its CPU time. With
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc ≥ 2.35; older ones ignore it) those mappings are
  transparent huge pages: a few thousand faults and a ≈15% faster step. The PyTorch worker
  inherits the setting. `--small_pages` (or any GLIBC_TUNABLES already naming it) keeps as is.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if sys.platform != "linux" or "--small_pages" in argv or "glibc.malloc.hugetlb" in tunables:
    return
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES]))}
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


if __name__ == "__main__":
  with_huge_pages(sys.argv[1:])
  with user_errors.clean_exit():
    main()
