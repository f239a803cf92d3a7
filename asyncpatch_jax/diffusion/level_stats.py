"""Statistics of the level maps a training sampler produces — the referee's question.

Does the controlled sampler keep enough mass on homogeneous maps (the ones sampling starts
from)? `level_statistics` measures, for any sampler and token grid: the std of a map's mean
level, the mean spatial std within a map, the share of exactly and of nearly homogeneous maps,
the share of maps with clean (level-0) context tokens, and a histogram of all levels.

Command (writes a JSON, a markdown table and a PNG plot into --out):

  python -m asyncpatch_jax.diffusion.level_stats --out=docs/level_stats --grids=8,16,32
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from asyncpatch_jax.diffusion import level_samplers

Array = jax.Array
NEAR_HOMOGENEOUS_STD = 0.02


def level_statistics(sampler: level_samplers.LevelSampler, rng: Array, grid: Sequence[int], *,
                     num_maps: int = 4096, chunk: int = 1024, bins: int = 20,
                     near_std: float = NEAR_HOMOGENEOUS_STD) -> dict[str, Any]:
  """Measures the distribution of level maps `sampler(rng, (num_maps, *grid))` (see module)."""
  grid = tuple(int(g) for g in grid)
  sample = jax.jit(lambda key, n: sampler(key, (n, *grid)), static_argnums=1)
  means, stds, ranges, clean, hist = [], [], [], [], np.zeros(bins, np.int64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  for i, start in enumerate(range(0, num_maps, chunk)):
    n = min(chunk, num_maps - start)
    t = np.asarray(sample(jax.random.fold_in(rng, i), n), np.float64).reshape(n, -1)
    means.append(t.mean(1))
    stds.append(t.std(1))
    ranges.append(t.max(1) - t.min(1))
    clean.append((t == 0).any(1) & (t > 0).any(1))
    hist += np.histogram(t, bins=edges)[0]
  means, stds, ranges, clean = map(np.concatenate, (means, stds, ranges, clean))
  return {
      "grid": list(grid),
      "num_maps": num_maps,
      "mean_of_mean": float(means.mean()),
      "std_of_mean": float(means.std()),
      "mean_spatial_std": float(stds.mean()),
      "share_exactly_homogeneous": float((ranges == 0).mean()),
      f"share_nearly_homogeneous_std<{near_std}": float((stds < near_std).mean()),
      "share_with_clean_context": float(clean.mean()),
      "histogram": hist.tolist(),
      "bin_edges": edges.tolist(),
  }


def preset_configs() -> dict[str, Mapping[str, Any]]:
  """The samplers compared in the docs: the naive ones, the controlled one, the default mix."""
  return {
      "iid": {"name": "iid"},
      "homogeneous": {"name": "homogeneous"},
      "controlled": {"name": "controlled"},
      "controlled_logit_normal": {"name": "controlled", "mean_distribution": "logit_normal"},
      "default_mixture": level_samplers.default_config().to_dict(),
  }


def _plot(results: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name in names:
    grids = [r["grid"][0] for r in results[name]]
    axes[0].plot(grids, [r["std_of_mean"] for r in results[name]], "o-", label=name)
    axes[1].plot(grids, [r["share_exactly_homogeneous"] for r in results[name]], "o-", label=name)
    r = results[name][0]
    centres = 0.5 * (np.array(r["bin_edges"][1:]) + np.array(r["bin_edges"][:-1]))
    density = np.array(r["histogram"]) / max(1, sum(r["histogram"]))
    axes[2].plot(centres, density, "o-", label=f"{name} ({r['grid'][0]}²)")
  axes[0].set(xlabel="token grid side", ylabel="std of the mean level", xscale="log", yscale="log",
              title="spread of the mean level")
  axes[1].set(xlabel="token grid side", ylabel="share", xscale="log",
              title="exactly homogeneous maps")
  axes[2].set(xlabel="level", ylabel="share of tokens", title="histogram of levels")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _write_atomic(path: pathlib.Path, text: str) -> None:
  with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
    f.write(text)
  os.replace(f.name, path)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="docs/level_stats", help="output folder")
  parser.add_argument("--grids", default="8,16,32", help="token grid sides (square grids)")
  parser.add_argument("--num_maps", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sampler_json", default=None,
                      help="a level_sampler config as JSON (default: the documented presets)")
  args = parser.parse_args(argv)
  configs = (preset_configs() if args.sampler_json is None
             else {"custom": json.loads(args.sampler_json)})
  grids = [int(g) for g in args.grids.split(",")]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results: dict[str, list[dict[str, Any]]] = {}
  rng = jax.random.key(args.seed)
  for name, cfg in configs.items():
    sampler = level_samplers.from_config(cfg)
    results[name] = [level_statistics(sampler, rng, (g, g), num_maps=args.num_maps)
                     for g in grids]
  near_key = f"share_nearly_homogeneous_std<{NEAR_HOMOGENEOUS_STD}"
  lines = ["| sampler | grid | std of mean | mean spatial std | exactly homog. | "
           f"nearly homog. (std<{NEAR_HOMOGENEOUS_STD}) | with clean context |",
           "|---|---|---|---|---|---|---|"]
  for name, rows in results.items():
    for r in rows:
      lines.append(f"| {name} | {r['grid'][0]}×{r['grid'][1]} | {r['std_of_mean']:.4f} | "
                   f"{r['mean_spatial_std']:.4f} | {r['share_exactly_homogeneous']:.3f} | "
                   f"{r[near_key]:.3f} | {r['share_with_clean_context']:.3f} |")
  table = "\n".join(lines)
  _write_atomic(out / "level_stats.json", json.dumps(
      {"configs": {k: dict(v) for k, v in configs.items()}, "results": results}, indent=1))
  _write_atomic(out / "level_stats.md", table + "\n")
  _plot(results, out / "level_stats.png")
  print(table)
  print(f"wrote {out}/level_stats.{{json,md,png}}")


if __name__ == "__main__":
  main()
