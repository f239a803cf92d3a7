"""benchmarks/claims.py at toy size (--quick), its argument checks, and the texture statistics."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from asyncpatch_jax import sampling
from asyncpatch_jax.evaluation import texture_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_claims():
  spec = importlib.util.spec_from_file_location("claims", os.path.join(ROOT, "benchmarks",
                                                                       "claims.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("claims", module)  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _run_quick(tmp_path, *extra):
  """The script as a user runs it: its own process on one CPU device."""
  out = tmp_path / "claims"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  argv = [sys.executable, os.path.join(ROOT, "benchmarks", "claims.py"), "--quick",
          "--out", str(out), *extra]
  start = time.perf_counter()
  proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  print(f"quick run {extra}: {time.perf_counter() - start:.1f} s")
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((out / "claims.json").read_text())
  assert results["status"].startswith("finished")
  assert (out / "claims.md").read_text() in proc.stdout
  for name in results["plots"]:
    assert (out / name).stat().st_size > 0
  return out, results


def _finite(*values):
  return all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_quick_guidance_and_acceleration(tmp_path):
  """CI: one network on the textures, claims 4 (input guidance) and 5 (acceleration)."""
  out, results = _run_quick(tmp_path, "--claims", "textures=4,5")
  assert list(results["models"]) == ["textures/asyncpatch"]
  assert results["models"]["textures/asyncpatch"]["steps"] == 3
  steps = results["settings"]["sample_steps"]

  guidance = results["claims"]["4"]["textures"]
  assert set(guidance["rows"]) == {"ω=0", "ω=1, k=0.5"}
  assert guidance["rows"]["ω=0"]["nfe"] == steps
  assert guidance["rows"]["ω=1, k=0.5"]["nfe"] == 2 * steps  # the guided branch doubles calls
  for row in guidance["rows"].values():
    assert _finite(row["lpips"], row["gram"], row["local_stats"])
  assert _finite(*guidance["ground_truth"].values())

  accel = results["claims"]["5"]["textures"]["rows"]
  adaptive = [r for r in accel.values() if r["kind"].startswith("adaptive")]
  assert len(adaptive) == 2 and all(1 <= r["nfe"] <= steps for r in adaptive)
  for label, row in accel.items():
    assert _finite(row["fid"], row["kid"]) and row["fid"] >= 0
    assert (out / row["grid"]).exists()
    if row["kind"] == "uniform":
      assert row["nfe"] == row["budget"] and label == f"uniform, {row['budget']} steps"
  assert "claim5_fid_vs_nfe_textures.png" in results["plots"]


@pytest.mark.slow
def test_quick_every_claim(tmp_path):
  """All six claims on MNIST at toy size: three networks, NFE bookkeeping of every sampler."""
  _, results = _run_quick(tmp_path)
  s = results["settings"]
  assert set(results["claims"]) == {"1", "2", "3", "4", "5", "6"}
  counts = {m["steps"] for m in results["models"].values()}
  assert counts == {s["train_steps"]}  # equal training compute
  for claim in ("1", "2"):
    for row in results["claims"][claim]["mnist"]["rows"].values():
      assert _finite(row["fid"], row["bpd"], row["bpd_se"]) and row["bpd"] > 0
      assert row["nfe"] == s["sample_steps"]
    pair = results["claims"][claim]["mnist"]["bpd_difference"]
    assert _finite(*pair.values()) and pair["bpd_diff_se"] > 0
  inpaint = results["claims"]["3"]["mnist"]["rows"]
  assert set(inpaint) == set(s["masks"].split(","))
  for methods in inpaint.values():
    assert methods["native (asyncpatch)"]["nfe"] == s["sample_steps"]
    assert methods["RePaint (conventional)"]["nfe"] == sampling.repaint_nfe(
        s["sample_steps"], s["repaint_jump"], s["repaint_resample"])
    assert methods["replacement, RePaint r=1 (conventional)"]["nfe"] == s["sample_steps"]
    assert all(_finite(m["lpips"]) for m in methods.values())
  ar = results["claims"]["6"]["mnist"]["rows"]
  grid = s["image_size"] // 2  # the MNIST config's 2×2 tokens
  assert ar["sampling"]["autoregressive (raster)"]["nfe"] == sampling.autoregressive_num_steps(
      grid * grid, s["ar_steps_per_group"], s["ar_overlap"])
  for name, bounds in ar["bits_per_dim"].items():
    for path in ("raster", "homogeneous"):
      assert _finite(bounds[path]["bpd"], bounds[path]["bpd_se"])
      assert ("bpd_diff" in bounds[path]) == (name != "asyncpatch")


def test_bits_per_dim_verdicts_and_tables_carry_standard_errors():
  claims = _load_claims()
  pair = {"bpd_diff": -0.05, "bpd_diff_se": 0.01, "bpd_diff_se_unpaired": 0.2}
  assert claims.paired_verdict(pair).startswith("asyncpatch better")
  assert claims.paired_verdict({**pair, "bpd_diff": 0.015}).startswith("no significant")
  assert claims.paired_verdict({**pair, "bpd_diff": 0.05}).startswith("asyncpatch worse")
  assert claims.paired_verdict({**pair, "bpd_diff": float("nan")}) == "not measurable"
  bound = {"bpd": 1.25, "bpd_se": 0.125}
  res = {"rows": {"sampling": {}, "bits_per_dim": {
      "asyncpatch": {"raster": bound, "homogeneous": bound},
      "iid": {"raster": {**bound, **pair}, "homogeneous": {**bound, **pair}}}}}
  table = "\n".join(claims.claim_table(6, res))
  assert "| asyncpatch | 1.250 ± 0.125 | – | 1.250 ± 0.125 | – |" in table
  assert "| iid | 1.250 ± 0.125 | -0.050 ± 0.010 | 1.250 ± 0.125 | -0.050 ± 0.010 |" in table
  rows = {"a": {"fid": 1.0, "kid": 0.1, "nfe": 4, **bound}}
  table = "\n".join(claims.claim_table(1, {"rows": rows, "bpd_difference": pair}))
  assert "1.250 ± 0.125" in table and "-0.050 ± 0.010 (unpaired ± 0.200)" in table


def test_claims_arguments():
  claims = _load_claims()
  assert claims.parse_plan(["mnist=2,1", "textures=4"]) == {"mnist": (1, 2), "textures": (4,)}
  for bad in (["cifar=1"], ["mnist"], ["mnist=7"], ["mnist=a"], ["mnist="]):
    with pytest.raises(ValueError, match="--claims"):
      claims.parse_plan(bad)
  with pytest.raises(ValueError, match="unknown mask"):
    claims.parse_args(["--masks", "box,circle"])
  with pytest.raises(ValueError, match="--num_fid"):
    claims.parse_args(["--num_fid", "1"])
  quick = claims.parse_args(["--quick", "--features", "inception", "--out", "/tmp/x"])
  assert quick.features == "inception" and quick.sample_steps == claims.QUICK["sample_steps"]
  assert quick.workdir == os.path.join("/tmp/x", "work")


def _texture(rng, shape=(2, 32, 32)):
  """A stationary texture: a sum of random sinusoids plus noise, in [-1, 1]."""
  y, x = np.mgrid[:shape[1], :shape[2]]
  img = np.zeros(shape)
  for _ in range(4):
    fy, fx, phase = rng.uniform(0.2, 1.2), rng.uniform(0.2, 1.2), rng.uniform(0, 6.3)
    img += np.sin(fy * y + fx * x + phase)
  img = img / 4 + 0.1 * rng.standard_normal(shape)
  return np.clip(img, -1, 1)


def test_texture_stats_separate_matching_from_wrong_fill():
  rng = np.random.default_rng(0)
  images = _texture(rng)
  known = np.ones(images.shape, bool)
  known[:, 8:24, 8:24] = False
  truth_gram = texture_stats.gram_distance(images, known)
  truth_local = texture_stats.local_stats_distance(images, known)
  flat = images.copy()
  flat[~known] = 0.0  # a blurry, mean-only completion
  assert np.all(texture_stats.gram_distance(flat, known) > 3 * truth_gram)
  assert np.all(texture_stats.local_stats_distance(flat, known) > 3 * truth_local)
  shifted = images.copy()
  shifted[~known] += 0.5  # same texture, brighter: the local mean moves by 0.5
  np.testing.assert_allclose(texture_stats.local_stats_distance(shifted, known),
                             truth_local + 0.5, atol=0.1)
  # [B, H, W, 1] images read as grey; a hole with no whole window gives NaN.
  np.testing.assert_allclose(texture_stats.gram_distance(images[..., None], known), truth_gram)
  assert np.isnan(texture_stats.local_stats_distance(images, known, window=32)).all()


def test_texture_stats_bad_input():
  images = np.zeros((2, 8, 8))
  with pytest.raises(ValueError, match="known mask"):
    texture_stats.gram_distance(images, np.ones((2, 4, 4), bool))
  with pytest.raises(ValueError, match="window"):
    texture_stats.local_stats_distance(images, np.ones((2, 8, 8), bool), window=1)
  with pytest.raises(ValueError, match="larger than"):
    texture_stats.local_stats_distance(images, np.ones((2, 8, 8), bool), window=16)
  all_known = np.ones((2, 8, 8), bool)
  assert np.isnan(texture_stats.gram_distance(images, all_known)).all()
  assert np.isnan(texture_stats.local_stats_distance(images, all_known, window=2)).all()
