"""One accelerator check: the figures issue 23 asks of a device, in one run, one results JSON.

Run by `benchmarks/device_check.sh` (≤ 8 minutes on one H100). On 32×32×4 latents (256×256
images through the SD VAE), bf16, with the recipe's per-token level maps:

  - `train`: the train step of DiT-B/2 and DiT-XL/2 (`benchmarks/throughput.py`'s
    `prepare_train_step`: the trainer's jitted, donated step): images/s, TFLOP/s, MFU;
  - `overhead`: forward + backward with per-token maps `[B, h, w]` vs one level per image `[B]`
    (`throughput.asynchrony_cases`), in the recommended DiT (`--adaln`);
  - `memory`: XLA's memory analysis of DiT-XL/2's compiled step (`scan_layers`) against batch
    size, with and without `remat='full'` (compiled, not run); its compile time at `train`'s
    batch beside the unrolled one of `train`;
  - `sampling`: the whole sampling loop of DiT-XL/2 (`throughput.sampling_case`): NFE/s;
  - `inception`: the FID Inception-v3 (`evaluation/inception.py`, as `evaluation/fid.py` runs
    it: 256² uint8 images resized to 299²) in images/s (untrained weights: same cost);
  - `kernels`: DiT-B/2's step under `model.kernels='cpu'` (the custom-VJP forms written for
    XLA:CPU) against the standard path the device runs by default.

Each part writes the JSON as it finishes; once `--budget_s` is spent the remaining parts are
recorded as skipped. `--tiny` runs every part at toy sizes on a CPU (the test). MFU uses
`train/perf.py`'s table of bf16 peaks (H100 SXM: 989 TFLOP/s dense).

    bash benchmarks/device_check.sh                # results/device_check_<device>.json
    python benchmarks/device_check.py --tiny --out /tmp/d.json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncpatch_jax import data as data_lib
from asyncpatch_jax.evaluation import inception
from asyncpatch_jax.models import precision
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import perf
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib
from benchmarks import throughput

# In order of need: parts left when the budget runs out are skipped.
PARTS = ("train", "overhead", "sampling", "inception", "memory", "kernels")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="toy sizes on a CPU (the test)")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="parts not started within this many seconds are skipped")
  parser.add_argument("--steps", type=int, default=8, help="timed train steps per case")
  parser.add_argument("--batch_b", type=int, default=256, help="DiT-B/2 train batch")
  parser.add_argument("--batch_xl", type=int, default=64, help="DiT-XL/2 train batch")
  parser.add_argument("--memory_batches", default="64,256",
                      help="DiT-XL/2 batches of the memory part (comma list)")
  parser.add_argument("--sample_batch", type=int, default=64)
  parser.add_argument("--sample_steps", type=int, default=32)
  parser.add_argument("--inception_batch", type=int, default=200)
  parser.add_argument("--adaln", default="single", choices=("block", "single"),
                      help="the recommended DiT's adaLN (the other one is measured for overhead)")
  parser.add_argument("--skip", default="", help=f"comma list of parts to skip: {PARTS}")
  parser.add_argument("--out", default="", help="JSON path (default results/device_check_"
                      "<device>.json)")
  return parser.parse_args(argv)


def dit_args(args, size: str, batch: int, **overrides) -> argparse.Namespace:
  """`throughput.py`'s arguments for a DiT-`size`/2 on 32×32×4 latents in bf16 (`--tiny`: its
  `--quick` toy sizes)."""
  argv = ["--model", "dit", "--dit_size", size, "--dit_patch", "2", "--image_size", "32",
          "--channels", "4", "--batch", str(batch), "--dtype", "bfloat16", "--steps",
          str(args.steps), "--sample_steps", str(args.sample_steps), "--adaln", args.adaln]
  out = throughput.parse_args(argv + ["--quick"] * args.tiny)
  if args.tiny:
    out.image_size, out.batch, out.steps, out.sample_steps, out.num_classes = 8, 4, 1, 2, 10
  for key, value in overrides.items():
    setattr(out, key, value)
  return out


def train_case(args, size: str, batch: int, kernels: str = "auto", **overrides) -> dict:
  """The real train step of DiT-`size`/2: compile time, images/s, MFU."""
  a = dit_args(args, size, batch, **overrides)
  with precision.kernels_scope(kernels) as resolved:
    run, info = throughput.prepare_train_step(throughput.make_config(a))
  t = throughput.timed(run, a.steps)
  peak = perf.peak_tflops(jax.devices()[0])
  return {**throughput.train_result(info, t, peak), "kernels": resolved, "adaln": a.adaln}


def memory_case(args, batch: int, remat: str, scan_layers: bool) -> dict:
  """XLA's memory analysis and compile time of DiT-XL/2's train step (compiled from abstract
  state and batch: nothing allocated, nothing run)."""
  a = dit_args(args, "XL", batch, remat=remat, scan_layers=scan_layers)
  config = throughput.make_config(a)
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  setup = state_lib.setup_state(config, mesh,
                                opt_lib.make_optimizer(config.optimizer, int(config.num_steps)))
  pipeline = data_lib.create_train_pipeline(config.data, batch_sharding)  # 'synthetic' data
  batch = next(pipeline)
  pipeline.close()
  abstract_batch = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding), batch)
  jitted = step_lib.jit_train_step(step_lib.make_train_step(config, setup), setup,
                                   batch_sharding)
  compiled, (lower_s, xla_s) = throughput.compile_timed(jitted, setup.abstract, abstract_batch,
                                                        split=True)
  out = {"batch": a.batch, "remat": remat or "off", "scan_layers": scan_layers,
         "compile_s": lower_s + xla_s, "lower_s": lower_s, "xla_compile_s": xla_s}
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # not every backend implements it
    return {**out, "memory_analysis": f"unavailable: {e}"}
  sizes = {k: float(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "temp", "alias", "generated_code")}
  # Donated state aliases its output: live at once are arguments + temporaries + the outputs
  # that do not alias an argument.
  sizes["peak_estimate"] = sizes["argument"] + sizes["temp"] + sizes["output"] - sizes["alias"]
  return {**out, **{f"{k}_bytes": v for k, v in sizes.items()}}


def inception_case(args) -> dict:
  """FID Inception-v3 features of uint8 images at the sample resolution, as `fid.py` computes
  them (`preprocess` then the network; untrained weights cost the same): images/s."""
  model = inception.InceptionV3()
  graphdef, state = nnx.split(model)
  # --tiny: 75×75 inputs (the smallest the network takes) straight into the network.
  size, batch = (75, 2) if args.tiny else (256, args.inception_batch)

  def features(state, images):
    x = images.astype(jnp.float32) / 128.0 - 1.0 if args.tiny else inception.preprocess(images)
    return nnx.merge(graphdef, state)(x)

  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)),
                       jnp.uint8)
  compiled, compile_s = throughput.compile_timed(jax.jit(features), state, images)
  t = throughput.timed(lambda: compiled(state, images), 1 if args.tiny else 5)
  return {"batch": batch, "image_size": size, "compile_s": compile_s, **t,
          "images_per_s": batch / t["wall_s"]}


def summary(entry: dict) -> dict:
  out = {}
  for name, r in entry.get("train", {}).items():
    out[f"{name}: MFU"] = r.get("mfu")
    out[f"{name}: images/s"] = r["images_per_s"]
  k = entry.get("kernels")
  if k and "DiT-B/2" in entry.get("train", {}):
    out["DiT-B/2 step: 'cpu' kernels / standard, wall time"] = (
        k["wall_s"] / entry["train"]["DiT-B/2"]["wall_s"])
  for adaln, cases in entry.get("overhead", {}).items():
    out[f"per-token overhead fwd+bwd (DiT-B/2, adaln={adaln}), wall"] = (
        cases["fwd+bwd, per-token map"]["wall_s"]
        / cases["fwd+bwd, one level per image [B]"]["wall_s"])
  xl = entry.get("train", {}).get("DiT-XL/2")
  scanned = [r for r in entry.get("memory", [])
             if xl and r["batch"] == xl["batch"] and r["remat"] == "off"]
  if scanned:
    out["DiT-XL/2 compile s, unrolled"] = xl["compile_s"]
    out["DiT-XL/2 compile s, scan_layers"] = scanned[0]["compile_s"]
  if "sampling" in entry:
    out["DiT-XL/2 sampling NFE/s"] = entry["sampling"]["nfe_per_s"]
  if "inception" in entry:
    out["FID Inception images/s"] = entry["inception"]["images_per_s"]
  return out


def table(entry: dict) -> str:
  f = throughput.fmt
  lines = [f"device: {entry['device_kind']} ({entry['backend']}), peak "
           f"{f(entry['peak_tflops'], 'g')} TFLOP/s bf16", "",
           "| train step | batch | kernels | compile s | images/s | TFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|"]
  rows = dict(entry.get("train", {}))
  if "kernels" in entry:
    rows["DiT-B/2 ('cpu' kernels)"] = entry["kernels"]
  for name, r in rows.items():
    lines.append(f"| {name} adaln={r['adaln']} | {r['batch']} | {r['kernels']} | "
                 f"{r['compile_s']:.1f} | {r['images_per_s']:.1f} | "
                 f"{f(r.get('tflops_per_s'), '.1f')} | {f(r.get('mfu'), '.1%')} |")
  if entry.get("memory"):
    lines += ["", "| DiT-XL/2 step | batch | remat | scan | compile s | peak GiB (XLA) |",
              "|---|---|---|---|---|---|"]
    for r in entry["memory"]:
      peak = r.get("peak_estimate_bytes")
      lines.append(f"| | {r['batch']} | {r['remat']} | {r['scan_layers']} | "
                   f"{r['compile_s']:.1f} | {f(None if peak is None else peak / 2**30)} |")
  lines += ["", "| figure | value |", "|---|---|"]
  lines += [f"| {name} | {f(value, '.3f')} |" for name, value in entry["summary"].items()]
  if entry.get("skipped"):
    lines.append(f"\nskipped (over budget or --skip): {', '.join(entry['skipped'])}")
  return "\n".join(lines)


def device_name(device: jax.Device) -> str:
  return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_") or device.platform


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  start = time.monotonic()
  device = jax.devices()[0]
  out = args.out or os.path.join("results", f"device_check_{device_name(device)}.json")
  skip = {w.strip() for w in args.skip.split(",") if w.strip()}
  entry: dict = {"backend": jax.default_backend(), "device_kind": device.device_kind,
                 "num_devices": jax.device_count(), "jax": jax.__version__,
                 "peak_tflops": perf.peak_tflops(device), "args": vars(args),
                 "kernels_default": precision.resolve_kernels("auto"),
                 "skipped": []}
  key = "tiny" if args.tiny else "full"
  batches = [int(b) for b in args.memory_batches.split(",") if b.strip()]
  if args.tiny:
    batches = [4, 8]
  batches = sorted({*batches, 4 if args.tiny else args.batch_xl})

  def train():
    entry["train"] = {"DiT-B/2": train_case(args, "B", args.batch_b),
                      "DiT-XL/2": train_case(args, "XL", args.batch_xl)}

  def kernels():
    entry["kernels"] = train_case(args, "B", args.batch_b, kernels="cpu")

  def overhead():
    config = throughput.make_config(dit_args(args, "B", args.batch_b))
    entry["overhead"] = {args.adaln: throughput.asynchrony_cases(config, 1 if args.tiny else 5)}

  def memory():
    entry["memory"] = [memory_case(args, batch, remat, True)
                       for remat in ("", "full") for batch in batches]

  def sampling():
    a = dit_args(args, "XL", args.sample_batch)
    entry["sampling"] = throughput.sampling_case(throughput.make_config(a), a, a.steps, None)

  def inception_part():
    entry["inception"] = inception_case(args)

  parts = {"train": train, "overhead": overhead, "sampling": sampling,
           "inception": inception_part, "memory": memory, "kernels": kernels}
  assert tuple(parts) == PARTS
  for name, run in parts.items():
    if name in skip or time.monotonic() - start > args.budget_s:
      entry["skipped"].append(name)
      continue
    throughput.log(f"device check: {name} ({time.monotonic() - start:.0f} s so far)")
    run()
    entry["elapsed_s"] = time.monotonic() - start
    entry["summary"] = summary(entry)
    throughput.write_json(out, key, {**entry, "peak_memory": throughput.peak_memory()})
  entry["summary"] = summary(entry)
  entry["peak_memory"] = throughput.peak_memory()
  entry["elapsed_s"] = time.monotonic() - start
  throughput.write_json(out, key, entry)
  print(table(entry))
  print(f"\nwrote {out}")
  return entry


if __name__ == "__main__":
  main()
