"""Pod sizing on paper: FLOPs, memory per chip, step time and days to train, from the configs.

For the shipped configs of ImageNet 256 (DiT-XL/2 and the paper's U-Net) and LSUN 256 (U-Net and
DiT-L/2), all on 32×32×4 SD-VAE latents, with the standard precision path of accelerators
(`model.kernels='standard'`, bf16 compute, float32 parameters and optimizer):

  - FLOPs per train step: the DiT's analytic count (`DiT.train_flops`, what `train/perf.py`
    reports MFU with) and, for every network, XLA's count of the lowered forward + backward
    (`perf.lowered_flops`; the U-Net has no analytic count, so its figures use XLA's);
  - memory per chip under the config's mesh (data × fsdp; batch split over both axes, parameters,
    gradients, AdamW moments and EMAs sharded over fsdp): float32 state of
    `(4 + 4 + 8 + 4·EMAs)` bytes per parameter / fsdp, plus activations: the autodiff residuals
    of the train loss's forward pass (what `jax.vjp` keeps for the backward pass, counted from
    abstract shapes: nothing is allocated) per example × the per-chip batch, without and with
    `model.remat='full'` (then the block inputs plus one block's activations);
  - step time and days to train at 40% MFU, and the largest batch per chip that fits in 90% of
    the chip's memory, on TPU v4, TPU v5p and H100 SXM.

The memory model is checked against XLA's `memory_analysis()` of compiled steps on a CPU
(`tests/test_pod_sizing.py`). Everything is computed from shapes; nothing runs on a device.

    python benchmarks/pod_sizing.py            # writes docs/pod_sizing.md
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from asyncpatch_jax.models import precision
from asyncpatch_jax.models.dit import DiT
from asyncpatch_jax.models.unet import ResAttn
from asyncpatch_jax.train import builders, perf
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib
from configs import imagenet, lsun

GiB = 2.0**30
MFU = 0.40
MEMORY_FRACTION = 0.9  # of HBM usable for state and activations (XLA workspace, fragmentation)
NUM_CHIPS = (8, 64)


class Chip(NamedTuple):
  name: str
  device_kind: str       # as `jax.Device.device_kind` reads, for `perf.peak_tflops`'s table
  hbm_bytes: float
  source: str


# Dense bf16 peaks come from `train/perf.py`'s table (one place); memory per chip and where both
# figures are published, in words.
CHIPS = (
    Chip("TPU v4", "TPU v4", 32 * GiB,
         "Google Cloud TPU v4 documentation (system architecture): 275 TFLOP/s bf16 and 32 GiB "
         "HBM2 per chip"),
    Chip("TPU v5p", "TPU v5p", 95 * GiB,
         "Google Cloud TPU v5p documentation: 459 TFLOP/s bf16 and 95 GiB HBM2e per chip"),
    Chip("H100 SXM", "H100", 80e9,
         "NVIDIA H100 Tensor Core GPU datasheet, SXM5: 989 TFLOP/s dense bf16 (1,979 with 2:4 "
         "sparsity) and 80 GB HBM3"),
)

# (name, config module, config argument).
RUNS = (
    ("ImageNet 256, DiT-XL/2", imagenet, "dit"),
    ("ImageNet 256, U-Net", imagenet, "unet"),
    ("LSUN 256, U-Net", lsun, "unet"),
    ("LSUN 256, DiT-L/2", lsun, "dit"),
)


def chip_peak(chip: Chip) -> float:
  peak = dict(perf.PEAK_TFLOPS).get(chip.device_kind)
  if peak is None:
    raise ValueError(f"{chip.device_kind!r} is not in train/perf.py's PEAK_TFLOPS")
  return peak


def setup(config: Any) -> state_lib.StateSetup:
  """The train state's abstract setup for `config` on one device (shapes only), under the
  standard kernels."""
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  tx = opt_lib.make_optimizer(config.optimizer, int(config.num_steps))
  with precision.kernels_scope("standard"):
    return state_lib.setup_state(config, mesh, tx)


def abstract_batch(config: Any, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A train batch's shapes: uint8 images, or float32 latents from a latent cache."""
  latents = config.data.source == "latents"
  return {"image": jax.ShapeDtypeStruct((batch, *builders.data_shape(config)),
                                        jnp.float32 if latents else jnp.uint8),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def train_loss(config: Any, s: state_lib.StateSetup):
  """`loss(params, model_state, batch) -> loss`: the train step's objective (`make_loss_fn`:
  level maps, corruption, the network, the loss) at a fixed key."""
  loss_fn = step_lib.make_loss_fn(config, s.model_def)
  return lambda params, model_state, batch: loss_fn(params, model_state, batch,
                                                    jax.random.key(0))[0]


def residual_bytes(config: Any, s: state_lib.StateSetup, batch: int) -> float:
  """Bytes of what autodiff keeps from the train loss's forward pass for its backward pass
  (`jax.vjp`'s residuals) at `batch`, from abstract shapes."""
  loss = train_loss(config, s)
  with precision.kernels_scope("standard"):
    vjp = jax.eval_shape(lambda p, m, b: jax.vjp(lambda p: loss(p, m, b), p)[1],
                         s.abstract.params, s.abstract.model_state, abstract_batch(config, batch))
  return float(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(vjp)))


def remat_blocks(model: nnx.Module) -> int:
  """How many blocks `model.remat` recomputes, one at a time, in the backward pass."""
  if isinstance(model, DiT):
    return model.depth
  return sum(1 for _, m in nnx.iter_graph(model) if isinstance(m, ResAttn))


def activation_bytes_per_example(config: Any, remat: str) -> float:
  """Activation bytes per example: the residuals' slope between batches 1 and 2 (what does not
  grow with the batch, e.g. bf16 copies of the weights, cancels). With `remat`, the residuals
  kept (block inputs) plus one block's activations, live while it is recomputed: the no-remat
  residuals over the number of blocks."""
  def slope(remat: str) -> tuple[float, state_lib.StateSetup]:
    c = with_model(config, remat=remat)
    s = setup(c)
    return residual_bytes(c, s, 2) - residual_bytes(c, s, 1), s

  off, s = slope("")
  if not remat:
    return off
  kept, _ = slope(remat)
  model = s.model_def.merge(s.abstract.params, s.abstract.model_state)
  return kept + (off - kept) / remat_blocks(model)


def with_model(config: Any, **fields) -> Any:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.update(kernels="standard", **fields)
  return config


def xla_train_flops_per_example(config: Any, s: state_lib.StateSetup) -> float | None:
  """XLA's FLOPs of the train loss's forward + backward at batch 1 (lowered, not compiled)."""
  grad = jax.jit(jax.grad(train_loss(config, s)))
  with precision.kernels_scope("standard"):
    return perf.lowered_flops(grad, s.abstract.params, s.abstract.model_state,
                              abstract_batch(config, 1))


def size_run(name: str, module: Any, arg: str) -> dict:
  """Every figure of one config (`module.get_config(arg)`) that does not depend on the chip."""
  config = with_model(module.get_config(arg))
  s = setup(config)
  params = state_lib.num_params(s.abstract.params)
  batch, steps = int(config.data.batch_size), int(config.num_steps)
  model = s.model_def.merge(s.abstract.params, s.abstract.model_state)
  analytic = perf.model_train_flops(model, 1)
  xla = xla_train_flops_per_example(config, s)
  emas = len(config.optimizer.ema_decays)
  return {
      "name": name, "config": f"{os.path.basename(module.__file__)}:{arg}",
      "params": params, "batch": batch, "steps": steps, "emas": emas,
      "mesh": (int(config.mesh.data), int(config.mesh.fsdp)),
      "flops_per_example": analytic or xla, "flops_source": "analytic" if analytic else "XLA",
      "xla_flops_per_example": xla,
      "state_bytes": (4 + 4 + 8 + 4 * emas) * params,
      "activation_bytes": {"off": activation_bytes_per_example(config, ""),
                           "full": activation_bytes_per_example(config, "full")},
      "_config": config,
  }


def per_chip(run: dict, chip: Chip, num_chips: int, remat: str) -> dict:
  data, fsdp = mesh_lib.mesh_shape(run["_config"].mesh, num_chips)
  local_batch = run["batch"] / (data * fsdp)
  state = run["state_bytes"] / fsdp
  act = run["activation_bytes"][remat]
  usable = MEMORY_FRACTION * chip.hbm_bytes
  return {"data": data, "fsdp": fsdp, "local_batch": local_batch, "state_gib": state / GiB,
          "activation_gib": act * local_batch / GiB,
          "total_gib": (state + act * local_batch) / GiB,
          "max_batch_per_chip": max(0, int((usable - state) // act))}


def step_seconds(run: dict, chip: Chip, num_chips: int) -> float:
  return run["flops_per_example"] * run["batch"] / (num_chips * chip_peak(chip) * 1e12 * MFU)


def report(runs: list[dict]) -> str:
  lines = [
      "# Pod sizing on paper",
      "",
      "Generated by `python benchmarks/pod_sizing.py` from the shipped configs; nothing here was "
      "measured on an accelerator. All runs are on 32×32×4 SD-VAE latents of 256×256 images, "
      "in bf16 with float32 parameters and AdamW (`model.kernels='standard'`, the path GPUs "
      "and TPUs take).",
      "",
      "## Assumptions",
      "",
      f"- Step time at {MFU:.0%} model FLOPs utilisation: FLOPs per step / (chips × peak × "
      f"{MFU}). FLOPs per step = 3 × forward FLOPs × batch (the DiT's analytic count, "
      "`DiT.train_flops`, as `train/perf.py` reports MFU; the U-Net has no analytic count, so "
      "XLA's count of its lowered forward + backward is used). Rematerialisation's recomputed "
      "forward is not counted, as MFU defines it: with `remat='full'` the hardware does about "
      "4/3 of these FLOPs, so the same step time needs about 53% hardware utilisation.",
      "- Peak dense bf16 TFLOP/s per chip (`train/perf.py`'s `PEAK_TFLOPS`) and memory:",
  ]
  lines += [f"  - {c.name}: {chip_peak(c):g} TFLOP/s, {c.hbm_bytes / GiB:.1f} GiB; source: "
            f"{c.source}." for c in CHIPS]
  lines += [
      "- Memory per chip: float32 parameters, gradients, AdamW's two moments and each EMA, "
      "`(4 + 4 + 8 + 4·EMAs)` bytes per parameter, divided over the mesh's fsdp axis (the "
      "configs' rules shard every kernel and embedding ≥ 64 Ki elements; the small replicated "
      "rest is ignored), plus activations: the autodiff residuals per example (`jax.vjp` of the "
      "train loss, counted from abstract shapes) × the per-chip batch; with `remat='full'`, "
      "the residuals kept (block inputs) plus one block's activations, live while it is "
      "recomputed. XLA's own workspace, fusion and buffer reuse move the true figure: without "
      "remat the model was checked against `memory_analysis()` of compiled CPU programs "
      "(`tests/test_pod_sizing.py`; XLA's per-example temporaries were 1.18× the model's for a "
      "small DiT); with remat it could not be, since XLA:CPU's schedule keeps the recomputed "
      "activations live (no saving on a CPU), so those rows are the model's until "
      "`benchmarks/device_check.sh` measures remat on a device. The largest batch per chip fits "
      f"state + activations into {MEMORY_FRACTION:.0%} of the chip's memory.",
      "- Meshes as shipped: ImageNet `data=1, fsdp=-1` (everything sharded over all chips); "
      "LSUN the base `data=-1, fsdp=1` (pure data parallelism, replicated state). The global "
      "batch splits over data × fsdp.",
      "",
      "## Per run",
      "",
      "| run | config | parameters | batch | steps | GFLOP / example (train) | XLA GFLOP / "
      "example | TFLOP / step | activations / example, no remat | with remat='full' |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in runs:
    lines.append(
        f"| {r['name']} | `{r['config']}` | {r['params'] / 1e6:.1f} M | {r['batch']} | "
        f"{r['steps']:,} | {r['flops_per_example'] / 1e9:.1f} ({r['flops_source']}) | "
        f"{(r['xla_flops_per_example'] or 0) / 1e9:.1f} | "
        f"{r['flops_per_example'] * r['batch'] / 1e12:.1f} | "
        f"{r['activation_bytes']['off'] / 2**20:.0f} MiB | "
        f"{r['activation_bytes']['full'] / 2**20:.1f} MiB |")
  lines += ["", "## Time to train at 40% MFU", "",
            "| run | chip | step s (8 chips) | days (8 chips) | days (64 chips) | chip-days |",
            "|---|---|---|---|---|---|"]
  for r in runs:
    for c in CHIPS:
      s8, s64 = step_seconds(r, c, 8), step_seconds(r, c, 64)
      lines.append(f"| {r['name']} | {c.name} | {s8:.3f} | {s8 * r['steps'] / 86400:.1f} | "
                   f"{s64 * r['steps'] / 86400:.2f} | {s8 * 8 * r['steps'] / 86400:.0f} |")
  lines += ["", "## Memory per chip", "",
            "GiB per chip for the config's global batch; the last column is the largest batch "
            "per chip that fits.", "",
            "| run | chip | chips | data × fsdp | batch / chip | remat | state | activations | "
            "total | fits | largest batch / chip |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    for c in CHIPS:
      for n in NUM_CHIPS:
        for remat in ("off", "full"):
          m = per_chip(r, c, n, remat)
          fits = m["total_gib"] * GiB <= MEMORY_FRACTION * c.hbm_bytes
          lines.append(
              f"| {r['name']} | {c.name} | {n} | {m['data']} × {m['fsdp']} | "
              f"{m['local_batch']:g} | {remat} | {m['state_gib']:.2f} | "
              f"{m['activation_gib']:.2f} | {m['total_gib']:.2f} | {'yes' if fits else 'no'} | "
              f"{m['max_batch_per_chip']} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="docs/pod_sizing.md")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  runs = [size_run(*run) for run in RUNS]
  text = report(runs)
  with open(args.out, "w") as f:
    f.write(text)
  print(text)
  return text


if __name__ == "__main__":
  main()
