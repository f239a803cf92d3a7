"""The level-statistics tool: the referee's figures, the command's outputs, and whether default
training covers every sampling strategy's maps."""

import jax
import numpy as np
import pytest

from asyncpatch_jax.diffusion import level_samplers as ls
from asyncpatch_jax.tools import level_stats
from asyncpatch_jax.tools.level_stats import level_statistics, map_features

KEY = jax.random.key(0)


def test_level_statistics_reports_the_referee_figures():
  stats = level_statistics(ls.Controlled(p_hom=0.5), KEY, (8, 8), num_maps=2048, chunk=512)
  assert abs(stats["share_exactly_homogeneous"] - 0.5) < 0.05
  assert abs(stats["std_of_mean"] - 12 ** -0.5) < 0.02
  assert sum(stats["histogram"]) == 2048 * 64
  iid = level_statistics(ls.IID(), KEY, (8, 8), num_maps=1024)
  assert iid["share_exactly_homogeneous"] == 0.0 and iid["std_of_mean"] < 0.05
  masked = level_statistics(ls.Masked(), KEY, (8, 8), num_maps=256)
  assert masked["share_with_clean_context"] > 0.9


def test_level_stats_command_writes_outputs(tmp_path):
  level_stats.main(["--out", str(tmp_path), "--grids", "4", "--num_maps", "64",
                    "--sampler_json", '{"name": "controlled"}'])
  for suffix in ("json", "md", "png"):
    assert (tmp_path / f"level_stats.{suffix}").stat().st_size > 0
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "level_stats.json", "level_stats.md", "level_stats.png"]  # no temporary left behind


def test_map_features_on_known_maps():
  t = np.zeros((2, 2, 4))
  t[0] = 0.5
  t[1, :, 2:] = 1.0  # left half clean, right half untouched: a sharp edge
  f = map_features(t)
  np.testing.assert_allclose(f[0], [0.5, 0.0, 1.0, 0.0, 0.0])
  # Row gaps: one of 3 per row is 1; column gaps: 0. Mean over the 6 + 4 gaps = 0.2.
  np.testing.assert_allclose(f[1], [0.5, 0.5, 0.0, 0.2, 0.5])


def _coverage(strategies, grid=(4, 4)):
  presets = level_stats.strategy_presets(num_steps=8)
  samplers = {"default": ls.default_config().to_dict(), "legacy": ls.legacy_config().to_dict()}
  return level_stats.coverage_table(samplers, grid, KEY, num_maps=4096,
                                    strategies={k: presets[k] for k in strategies})


def test_default_training_covers_grouped_autoregressive_maps():
  """A strategy whose maps default training never produces is a bug: AR with row groups at
  ρ = 0.75 (several rows in transition at small level gaps) is typical of the default mixture
  and not of the legacy one, whose staircases were per token with ρ ≤ 0.5."""
  table = _coverage(["AR rows ρ=0.75"])
  assert table["default"]["AR rows ρ=0.75"]["share_typical"] >= 0.95, table["default"]
  assert table["legacy"]["AR rows ρ=0.75"]["share_typical"] < 0.8, table["legacy"]


@pytest.mark.slow
def test_default_training_covers_every_sampling_strategy():
  table = _coverage(list(level_stats.strategy_presets()), grid=(8, 8))
  low = {k: v["share_typical"] for k, v in table["default"].items() if v["share_typical"] < 0.95}
  assert not low, f"strategies whose maps default training rarely produces: {low}"
