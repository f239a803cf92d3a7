"""Memory per chip of fine-tuning DiT-XL/2 into AsyncPatch (`configs/imagenet.py:dit` with
`--config.init_from`), the figures quoted in the README (issue 22).

Two parts, neither allocating the model:
  - the persistent train state, from the parameter count of the abstract network: float32
    parameters, AdamW's two moments and each EMA copy (16 bytes per parameter with one EMA),
    plus the float32 gradients (4 more) while a step runs; FSDP divides all of these by the
    number of chips (`mesh.fsdp`, the config's default is every chip);
  - the activations: XLA's own buffer assignment (`compiled.memory_analysis()`) of the real
    train step (`train/step.py`, per-token level maps, the config's bfloat16 compute), lowered
    on abstract inputs for one device at a few per-chip batch sizes, with and without
    `model.remat='full'`. `temp` is the peak of everything the step allocates besides its
    arguments (activations kept for the backward pass, gradients, optimizer temporaries, with
    XLA's buffer reuse); its growth per example between the two largest batches is the
    activation cost once activations set the peak (with remat, at small batches the optimizer
    update's float32 temporaries set it instead). XLA's CPU backend plans these buffers here;
    a GPU or TPU backend fuses differently, so read them as estimates.

    python benchmarks/dit_finetune_memory.py            # DiT-XL/2, batch 8, 32, 128 per chip
    python benchmarks/dit_finetune_memory.py --quick    # DiT-S/2 depth 2 (smoke test)

Writes `results/dit_finetune_memory.json` (or `--out`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncpatch_jax import file_io  # noqa: E402
from asyncpatch_jax.train import builders  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from asyncpatch_jax.train import optimizer as opt_lib  # noqa: E402
from asyncpatch_jax.train import state as state_lib  # noqa: E402
from asyncpatch_jax.train import step as step_lib  # noqa: E402
from configs import imagenet  # noqa: E402

GB = 1e9


def make_config(batch: int, remat: str, quick: bool):
  config = imagenet.get_config("dit")
  config.data.batch_size = batch
  config.mesh.fsdp, config.mesh.data = 1, 1  # one device: the per-chip program
  config.model.level_embedding = "dit"
  config.model.remat = remat
  config.model.dit.scan_layers = True  # the same buffers as unrolled blocks; compiles one block
  if quick:
    config.model.dit.size, config.model.dit.depth = "S", 2
  return config


def compiled_memory(config) -> dict:
  """Parameter count and XLA's memory analysis of the one-device train step (abstract inputs)."""
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  batch_sharding = mesh_lib.batch_sharding(mesh)
  setup = state_lib.setup_state(config, mesh,
                                opt_lib.make_optimizer(config.optimizer, int(config.num_steps)))
  b = int(config.data.batch_size)
  shape = builders.data_shape(config)
  batch = {"image": jax.ShapeDtypeStruct((b, *shape), jnp.float32, sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
  jitted = step_lib.jit_train_step(step_lib.make_train_step(config, setup), setup,
                                   batch_sharding)
  start = time.perf_counter()
  stats = jitted.lower(setup.abstract, batch).compile().memory_analysis()
  return {"params": state_lib.num_params(setup.abstract.params),
          "state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract)),
          "argument_bytes": stats.argument_size_in_bytes,
          "temp_bytes": stats.temp_size_in_bytes, "compile_s": time.perf_counter() - start}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", default="8,32,128", help="per-chip batch sizes (comma list)")
  parser.add_argument("--quick", action="store_true", help="DiT-S/2 at depth 2 (smoke test)")
  parser.add_argument("--out", default=str(ROOT / "results" / "dit_finetune_memory.json"))
  args = parser.parse_args(argv)
  rows = []
  for remat in ("", "full"):
    for b in (int(x) for x in args.batches.split(",")):
      row = {"batch_per_chip": b, "remat": remat or "off",
             **compiled_memory(make_config(b, remat, args.quick))}
      rows.append(row)
      print(f"[dit_finetune_memory] {row}", file=sys.stderr, flush=True)
  params = rows[0]["params"]
  per_example = {}
  for remat in ("off", "full"):
    same = sorted((r for r in rows if r["remat"] == remat), key=lambda r: r["batch_per_chip"])
    lo, hi = same[-2:] if len(same) > 1 else (same[0], same[0])  # the two largest batches
    if hi["batch_per_chip"] > lo["batch_per_chip"]:
      per_example[remat] = ((hi["temp_bytes"] - lo["temp_bytes"])
                            / (hi["batch_per_chip"] - lo["batch_per_chip"]))
  result = {
      "model": "DiT-S/2 depth 2" if args.quick else "DiT-XL/2",
      "config": "configs/imagenet.py:dit, model.level_embedding='dit', scan_layers, bfloat16",
      "backend": jax.default_backend(), "params": params,
      "state_bytes_per_param": rows[0]["state_bytes"] / params,
      "state_gb": rows[0]["state_bytes"] / GB, "gradients_gb": 4 * params / GB,
      "activation_gb_per_example": {k: v / GB for k, v in per_example.items()},
      "rows": rows,
      "note": "XLA CPU buffer assignment of the one-device train step; the machine was shared "
              "(memory figures do not depend on load)",
  }
  with file_io.atomic_open(args.out) as f:
    json.dump(result, f, indent=2)
  print(f"{result['model']}: {params / 1e6:.1f} M parameters, train state "
        f"{result['state_gb']:.2f} GB ({result['state_bytes_per_param']:.1f} B/param), "
        f"gradients {result['gradients_gb']:.2f} GB")
  print("| remat | batch/chip | arguments GB | temp GB |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['remat']} | {r['batch_per_chip']} | {r['argument_bytes'] / GB:.2f} | "
          f"{r['temp_bytes'] / GB:.2f} |")
  for remat, v in result["activation_gb_per_example"].items():
    print(f"activations per example (remat {remat}, the two largest batches): {v:.3f} GB")
  return result


if __name__ == "__main__":
  main()
