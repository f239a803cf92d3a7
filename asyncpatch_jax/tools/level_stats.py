"""Statistics of the level maps a training sampler produces, and whether they cover sampling's.

Does the controlled sampler keep enough mass on homogeneous maps (the ones sampling starts
from)? `level_statistics` measures, for any sampler and token grid: the std of a map's mean
level, the mean spatial std within a map, the share of exactly and of nearly homogeneous maps,
the share of maps with clean (level-0) context tokens, and a histogram of all levels.

Does training show the network every map a sampling strategy feeds it? `coverage` describes
each map by `map_features` (mean level, spatial std, share of tokens in transition, mean level
gap between neighbours, share of clean tokens) and calls a sampling map typical when its
distance to its k-th nearest training map (features scaled by the training spread) is within
the 99th percentile of the same distance among training maps. `strategy_maps` records the
maps along a strategy's trajectories (`sampling.sample(..., return_levels=True)` on the exact
Gaussian denoiser of a smooth 2-D field, so uncertainty-guided plans see real variances).

Commands (each writes a JSON, a markdown table and a PNG plot into --out):

  python -m asyncpatch_jax.tools.level_stats --out=docs/level_stats --grids=8,16,32
  python -m asyncpatch_jax.tools.level_stats --coverage --out=docs/level_stats
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax import file_io
from asyncpatch_jax.diffusion import level_samplers
from asyncpatch_jax.diffusion.parametrization import Prediction
from asyncpatch_jax.diffusion.schedules import get_schedule
from asyncpatch_jax.sampling import analytic, masks, sample
from asyncpatch_jax.sampling.input_guidance import DEFAULT_GUIDANCE_LEVEL

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


FEATURES = ("mean level", "spatial std", "share in transition", "neighbour gap", "share clean")
TYPICAL_QUANTILE = 0.99


def map_features(levels: Any) -> np.ndarray:
  """Per-map statistics `[n, 5]` (`FEATURES`) of level maps `[n, *grid]`."""
  t = np.asarray(levels, np.float64)
  n, grid = t.shape[0], t.shape[1:]
  flat = t.reshape(n, -1)
  gaps = [np.abs(np.diff(t, axis=a)).reshape(n, -1) for a in range(1, t.ndim) if grid[a - 1] > 1]
  gap = np.concatenate(gaps, 1).mean(1) if gaps else np.zeros(n)
  return np.stack([flat.mean(1), flat.std(1), ((flat > 0) & (flat < 1)).mean(1), gap,
                   (flat == 0).mean(1)], 1)


def _kth_distance(queries: np.ndarray, reference: np.ndarray, k: int, *,
                  exclude_self: bool = False, chunk: int = 512) -> np.ndarray:
  out = []
  for i in range(0, len(queries), chunk):
    d = np.sqrt(np.square(queries[i:i + chunk, None, :] - reference[None]).sum(-1))
    out.append(np.sort(d, axis=1)[:, k if exclude_self else k - 1])
  return np.concatenate(out) if out else np.zeros(0)


@dataclasses.dataclass(frozen=True)
class TrainingMaps:
  """The training sampler's maps, as features, with the typicality threshold."""

  features: np.ndarray
  scale: np.ndarray
  threshold: float
  k: int

  @classmethod
  def from_sampler(cls, sampler: level_samplers.LevelSampler, rng: Array, grid: Sequence[int],
                   *, num_maps: int = 8192, k: int = 5, num_calibration: int = 1024
                   ) -> TrainingMaps:
    t = np.asarray(jax.jit(lambda key: sampler(key, (num_maps, *grid)))(rng))
    features = map_features(t)
    scale = np.maximum(features.std(0), 1e-3)
    scaled = features / scale
    distance = _kth_distance(scaled[:num_calibration], scaled, k, exclude_self=True)
    return cls(scaled, scale, float(np.quantile(distance, TYPICAL_QUANTILE)), k)

  def typical(self, levels: Any) -> np.ndarray:
    """Whether each map `[n, *grid]` is typical of training (bool `[n]`)."""
    return _kth_distance(map_features(levels) / self.scale, self.features, self.k) <= (
        self.threshold)


def coverage(training: TrainingMaps, levels: Any) -> dict[str, Any]:
  """How typical maps `[n, *grid]` are of training: the share typical, and the features."""
  features = map_features(levels)
  typical = training.typical(levels)
  return {"num_maps": len(features), "share_typical": float(typical.mean()),
          **{name: float(v) for name, v in zip(FEATURES, features.mean(0))},
          "max tokens in transition": round(features[:, 2].max() * np.prod(
              np.shape(levels)[1:]))}


def gaussian_field_denoiser(grid: Sequence[int], schedule: Any, length_scale: float = 1.5):
  """The exact denoiser of a smooth Gaussian field on `grid` (one element per token) whose
  variance varies over the positions (0.2 to 1), so certainty differs between tokens."""
  pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1)
  pos = pos.reshape(-1, len(grid)).astype(np.float64)
  corr = np.exp(-0.5 * np.square(pos[:, None] - pos[None]).sum(-1) / length_scale**2)
  scale = np.sqrt(0.2 + 0.8 * (pos[:, -1] + 0.5) / grid[-1])
  cov = scale[:, None] * (0.95 * corr + 0.05 * np.eye(len(pos))) * scale[None]
  return analytic.GaussianDenoiser(np.zeros(len(pos)), cov, schedule)


def strategy_presets(num_steps: int = 16) -> dict[str, dict[str, Any]]:
  """Every sampling strategy the package offers, as `sample` keywords (plus 'mask': a known
  region from `sampling.masks`, and 'guidance_level': also record the maps of input
  guidance's second branch, the context re-noised to that level)."""
  n = num_steps
  return {
      "uniform": dict(strategy="uniform", num_steps=n),
      "inpaint (half)": dict(strategy="uniform", num_steps=n, mask="half"),
      "input guidance (k=0.5)": dict(strategy="uniform", num_steps=n, mask="box",
                                     input_guidance=1.0, guidance_level=0.5),
      "input guidance (k=0.8)": dict(strategy="uniform", num_steps=n, mask="half",
                                     input_guidance=1.0, guidance_level=0.8),
      "adaptive budget": dict(strategy="adaptive", rule="budget", num_steps=n),
      "adaptive budget (inpaint)": dict(strategy="adaptive", rule="budget", num_steps=n,
                                        mask="box"),
      "AR token raster ρ=0": dict(strategy="autoregressive", steps_per_group=2, overlap=0.0),
      "AR token raster ρ=0.75": dict(strategy="autoregressive", steps_per_group=4, overlap=0.75),
      "AR rows ρ=0.75": dict(strategy="autoregressive", steps_per_group=8, overlap=0.75,
                             group_shape="row"),
      "AR block2 spiral ρ=0.5": dict(strategy="autoregressive", steps_per_group=4, overlap=0.5,
                                     group_shape=2, order="spiral"),
      "AR certainty ρ=0.75": dict(strategy="autoregressive", steps_per_group=4, overlap=0.75,
                                  order="certainty"),
      "AR rows (outpaint half)": dict(strategy="autoregressive", steps_per_group=4,
                                      overlap=0.5, group_shape="row", mask="half"),
      "AR rows + guidance": dict(strategy="autoregressive", steps_per_group=4, overlap=0.5,
                                 group_shape="row", mask="half", input_guidance=1.0),
  }


def strategy_maps(spec: Mapping[str, Any], grid: Sequence[int], rng: Array, *,
                  batch: int = 16, schedule: str = "cosine") -> np.ndarray:
  """The level maps `[n, *grid]` a strategy feeds the network along `batch` trajectories."""
  grid = tuple(int(g) for g in grid)
  kwargs = dict(spec)
  mask_name = kwargs.pop("mask", None)
  sched = get_schedule(schedule)
  x_shape = (batch, *grid, 1)
  extra = {}
  if mask_name is not None:
    known_mask = masks.make_mask(mask_name, batch, grid, seed=0)
    extra = dict(known=jnp.zeros(x_shape), known_mask=known_mask)
  if kwargs.get("strategy") == "adaptive" or kwargs.get("order") == "certainty":
    denoiser = gaussian_field_denoiser(grid, sched)
  else:  # a static plan: the maps do not depend on the denoiser
    def denoiser(z, t):
      return Prediction(jnp.zeros_like(z), jnp.ones_like(z))
  run = jax.jit(lambda key: sample(denoiser, key, x_shape, schedule=sched, return_levels=True,
                                   **extra, **kwargs))
  _, info = run(rng)
  steps = int(info["num_steps"])
  maps = np.asarray(info["levels"])[:steps]  # the inputs of the steps taken
  maps = maps[(maps > 0).reshape(steps, batch, -1).any(-1)]  # examples still running
  if kwargs.get("input_guidance", 0):
    level = kwargs.get("guidance_level", DEFAULT_GUIDANCE_LEVEL)
    known = np.asarray(extra["known_mask"])
    branch = np.asarray(info["levels"])[:steps]
    branch = np.where(known[None], level, branch)[(branch > 0).reshape(steps, batch, -1).any(-1)]
    maps = np.concatenate([maps, branch])
  return maps.reshape(-1, *grid)


def coverage_table(samplers: Mapping[str, Mapping[str, Any]], grid: Sequence[int], rng: Array,
                   *, strategies: Mapping[str, Mapping[str, Any]] | None = None,
                   num_maps: int = 8192) -> dict[str, dict[str, Any]]:
  """For every training sampler config and sampling strategy, `coverage` of its maps."""
  strategies = strategy_presets() if strategies is None else strategies
  maps = {name: strategy_maps(spec, grid, jax.random.fold_in(rng, i))
          for i, (name, spec) in enumerate(strategies.items())}
  out = {}
  for sampler_name, cfg in samplers.items():
    training = TrainingMaps.from_sampler(level_samplers.from_config(cfg), rng, grid,
                                         num_maps=num_maps)
    out[sampler_name] = {name: coverage(training, m) for name, m in maps.items()}
  return out


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
  import matplotlib  # heavy and only for the figure: imported when one is drawn

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
  with file_io.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="docs/level_stats", help="output folder")
  parser.add_argument("--grids", default="8,16,32", help="token grid sides (square grids)")
  parser.add_argument("--num_maps", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sampler_json", default=None,
                      help="a level_sampler config as JSON (default: the documented presets)")
  parser.add_argument("--coverage", action="store_true",
                      help="instead: how typical every sampling strategy's maps are under the "
                           "default and the legacy training samplers (first grid only)")
  args = parser.parse_args(argv)
  if args.coverage:
    main_coverage(args)
    return
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
  file_io.write_text(out / "level_stats.json", json.dumps(
      {"configs": {k: dict(v) for k, v in configs.items()}, "results": results}, indent=1))
  file_io.write_text(out / "level_stats.md", table + "\n")
  _plot(results, out / "level_stats.png")
  print(table)
  print(f"wrote {out}/level_stats.{{json,md,png}}")


def main_coverage(args: Any) -> None:
  grid = (int(args.grids.split(",")[0]),) * 2
  samplers = ({"default": level_samplers.default_config().to_dict(),
               "legacy": level_samplers.legacy_config().to_dict()}
              if args.sampler_json is None else {"custom": json.loads(args.sampler_json)})
  table = coverage_table(samplers, grid, jax.random.key(args.seed), num_maps=args.num_maps)
  names = list(samplers)
  lines = [f"| strategy | maps | {' | '.join(f'typical under {n}' for n in names)} | "
           + " | ".join(FEATURES) + " | max tokens in transition |",
           "|---|---|" + "---|" * (len(names) + len(FEATURES) + 1)]
  first = table[names[0]]
  for strategy, row in first.items():
    shares = " | ".join(f"{table[n][strategy]['share_typical']:.3f}" for n in names)
    feats = " | ".join(f"{row[f]:.3f}" for f in FEATURES)
    lines.append(f"| {strategy} | {row['num_maps']} | {shares} | {feats} | "
                 f"{row['max tokens in transition']} |")
  text = "\n".join(lines)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  file_io.write_text(out / "coverage.json", json.dumps(
      {"grid": list(grid), "samplers": samplers, "typical_quantile": TYPICAL_QUANTILE,
       "results": table}, indent=1, default=float))
  file_io.write_text(out / "coverage.md", text + "\n")
  print(text)
  print(f"wrote {out}/coverage.{{json,md}}")


if __name__ == "__main__":
  main()
