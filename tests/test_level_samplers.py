"""Training level samplers: measured statistics match their parameters."""

import jax
import numpy as np
import pytest

from asyncpatch_jax.diffusion import level_samplers as ls

KEY = jax.random.key(0)


def _maps(sampler, shape=(4096, 8, 8)):
  t = np.asarray(jax.jit(lambda k: sampler(k, shape))(KEY), np.float64)
  assert t.shape == shape and t.min() >= 0.0 and t.max() <= 1.0
  return t.reshape(shape[0], -1)


def test_iid_uniform():
  t = _maps(ls.IID())
  assert abs(t.mean() - 0.5) < 0.01 and abs(t.std() - 12 ** -0.5) < 0.01
  # The mean of 64 iid uniforms has std 1/sqrt(12·64) ≈ 0.036 (docs/method.md).
  assert abs(t.mean(1).std() - (12 * 64) ** -0.5) < 0.003


def test_homogeneous_uniform_and_logit_normal():
  t = _maps(ls.Homogeneous())
  assert np.all(t.max(1) == t.min(1))
  assert abs(t[:, 0].std() - 12 ** -0.5) < 0.01
  t = _maps(ls.Homogeneous(mean_distribution="logit_normal", logit_loc=1.0, logit_scale=0.5))
  logits = np.log(t[:, 0] / (1 - t[:, 0]))
  assert abs(logits.mean() - 1.0) < 0.03 and abs(logits.std() - 0.5) < 0.03


@pytest.mark.parametrize("exact_mean", [True, False])
def test_controlled_sampler_statistics(exact_mean):
  sampler = ls.Controlled(p_hom=0.3, kappa=0.8, exact_mean=exact_mean, t_min=0.1, t_max=0.9)
  t = _maps(sampler)
  spread = t.max(1) - t.min(1)
  hom = spread == 0
  assert abs(hom.mean() - 0.3) < 0.03, hom.mean()
  assert t.min() >= 0.1 and t.max() <= 0.9
  means = t.mean(1)
  if exact_mean:
    # t̄ is uniform on [0.1, 0.9] and every map's mean is exactly t̄.
    assert abs(means.std() - 0.8 / 12 ** 0.5) < 0.01
    assert abs(means.mean() - 0.5) < 0.01
    # Each map stays within t̄ ± κ·min(t̄ − t_min, t_max − t̄).
    room = np.minimum(means - 0.1, 0.9 - means)
    assert np.all(np.abs(t - means[:, None]) <= 0.8 * room[:, None] + 1e-5)
  else:
    # Without re-centring the map mean scatters around t̄ by δ/sqrt(3·64) at most.
    assert np.all(np.abs(means - (t.max(1) + t.min(1)) / 2) <= spread / 2 + 1e-6)
  # Heterogeneous maps have a real spread.
  assert np.median(spread[~hom]) > 0.05


def test_masked_maps_have_clean_context_and_one_level_elsewhere():
  sampler = ls.Masked(kinds=("random",), known_fraction=(0.25, 0.75))
  t = _maps(sampler)
  known = t == 0
  assert 0.4 < known.mean() < 0.6
  unknown_levels = np.where(known, np.nan, t)
  assert np.nanmax(np.nanstd(unknown_levels, 1)) < 1e-6  # one level t̄ on the unknown tokens
  for kind in ("half", "box", "crop"):
    t = _maps(ls.Masked(kinds=(kind,), known_fraction=(0.3, 0.3)), shape=(512, 8, 8))
    known = (t == 0).reshape(512, 8, 8)
    if kind == "half":
      np.testing.assert_allclose(known.mean((1, 2)), 0.5)
    else:
      assert abs(known.mean() - 0.3) < 0.06, (kind, known.mean())  # f is the known share


def test_staircase_is_the_autoregressive_plan():
  t = _maps(ls.Staircase(order="raster", max_overlap=0.0), shape=(2048, 4, 4))
  assert np.all(np.diff(t, axis=1) >= 0), "raster order: earlier tokens are cleaner"
  partial = ((t > 0) & (t < 1)).sum(1)
  assert partial.max() <= 1, "without overlap only one token is in flight"
  t = _maps(ls.Staircase(order="random", max_overlap=0.5), shape=(2048, 4, 4))
  assert not np.all(np.diff(t, axis=1) >= 0)
  assert ((t > 0) & (t < 1)).sum(1).max() > 1


def test_mixture_proportions_and_from_config():
  cfg = {"name": "mixture", "components": {
      "a": {"name": "homogeneous", "weight": 3.0, "t_min": 0.0, "t_max": 0.1},
      "b": {"name": "homogeneous", "weight": 1.0, "t_min": 0.9, "t_max": 1.0}}}
  t = _maps(ls.from_config(cfg))
  assert abs((t[:, 0] < 0.5).mean() - 0.75) < 0.03
  assert isinstance(ls.from_config(ls.default_config()), ls.Mixture)
  assert ls.from_config({"name": "mask", "kinds": "half,box"}).kinds == ("half", "box")


def test_sampler_bad_input():
  with pytest.raises(ValueError, match="unknown level_sampler name 'uniform'"):
    ls.from_config({"name": "uniform"})
  with pytest.raises(ValueError, match=r"fields for 'controlled': \['kapa'\]"):
    ls.from_config({"name": "controlled", "kapa": 1.0})
  with pytest.raises(ValueError, match="p_hom"):
    ls.Controlled(p_hom=1.5)
  for cls in (ls.IID, ls.Homogeneous):
    with pytest.raises(ValueError, match="t_min < t_max"):
      cls(t_min=0.5, t_max=0.2)
  with pytest.raises(ValueError, match="non-empty subset"):
    ls.Masked(kinds=("circle",))
  with pytest.raises(ValueError, match=r"shape is \(B, \*grid\)"):
    ls.IID()(KEY, (4,))


def test_grouped_staircase_matches_autoregressive_layouts():
  # Rows in raster order without overlap: whole rows share one level, one row in flight.
  t = _maps(ls.Staircase(order="raster", groups="row", max_overlap=0.0), shape=(1024, 4, 4))
  rows = t.reshape(-1, 4, 4)
  assert np.all(rows.max(2) == rows.min(2)), "a row is one group: one level"
  assert ((rows[:, :, 0] > 0) & (rows[:, :, 0] < 1)).sum(1).max() <= 1
  # 2×2 blocks: every block holds one level.
  t = _maps(ls.Staircase(order="spiral", groups="block2", max_overlap=0.5),
            shape=(512, 4, 4)).reshape(-1, 2, 2, 2, 2)
  assert np.all(t.max((2, 4)) == t.min((2, 4)))
  # ρ up to 0.9: many groups in transition at small level gaps, as the claims' ρ = 0.75 plan.
  t = _maps(ls.Staircase(order="random", groups="token", max_overlap=0.9), shape=(2048, 8, 8))
  assert ((t > 0) & (t < 1)).sum(1).max() >= 8
  with pytest.raises(ValueError, match="unknown group layout 'hexagon'"):
    ls.Staircase(groups="hexagon")
  with pytest.raises(ValueError, match="order must be one or more"):
    ls.Staircase(order="raster,zigzag")


def test_staircase_context_and_masked_noisy_context():
  t = _maps(ls.Staircase(p_context=1.0, max_overlap=0.0))
  assert (t == 0).mean() > 0.3
  sampler = ls.Masked(kinds=("half",), known_fraction=(0.5, 0.5), p_noisy_context=0.5)
  t = _maps(sampler).reshape(-1, 8, 8)
  # The known half sits at one level k per map: 0 in about half the maps, else k ~ U(0, 1),
  # independent of the unknown half's t̄ (k > t̄ about as often as k < t̄).
  halves = np.stack([t[:, :4].reshape(len(t), -1), t[:, 4:].reshape(len(t), -1),
                     t[:, :, :4].reshape(len(t), -1), t[:, :, 4:].reshape(len(t), -1)], 1)
  flat = halves.max(2) == halves.min(2)
  assert flat.sum(1).min() >= 2
  context = np.where(flat, halves[:, :, 0], np.nan)
  levels = np.sort(context, 1)[:, :2]  # the two flat halves: context and unknown
  assert abs((levels[:, 0] == 0).mean() - 0.5) < 0.05


def test_smooth_field_is_spatially_correlated():
  t = _maps(ls.SmoothField(max_amplitude=0.6), shape=(2048, 16, 16)).reshape(-1, 16, 16)
  neighbour_gap = np.abs(np.diff(t, axis=2)).mean()
  shuffled = np.random.default_rng(0).permuted(t.reshape(len(t), -1), axis=1).reshape(t.shape)
  assert neighbour_gap < 0.5 * np.abs(np.diff(shuffled, axis=2)).mean()
  assert ((t == 0).any((1, 2)) & (t > 0).any((1, 2))).mean() > 0.1  # regions already clean
  assert t.std((1, 2)).mean() > 0.05


def test_default_mixture_has_every_sampling_component():
  cfg = ls.default_config()
  assert set(cfg.components) == {"controlled", "mask", "staircase", "smooth"}
  mixture = ls.from_config(cfg)
  names = sorted(type(c).__name__ for _, c in mixture.components)
  assert names == ["Controlled", "Masked", "SmoothField", "Staircase"]
  assert ls.from_config(ls.legacy_config()).components[2][1].max_overlap == 0.5
