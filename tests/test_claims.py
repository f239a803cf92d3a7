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


VERDICTS = {"holds", "fails", "not significant"}


def _check_fid_row(row):
  assert _finite(row["fid"], row["fid_lo"], row["fid_hi"], row["kid"], row["kid_lo"],
                 row["kid_hi"])
  assert row["fid_lo"] <= row["fid_hi"] and row["kid_lo"] <= row["kid_hi"]
  assert not any(k.endswith("_boot") for k in row)  # replicates stay in the workdir


def test_quick_guidance_and_acceleration(tmp_path):
  """CI: one network on the textures, claims 4 (input guidance) and 5 (FID against NFE)."""
  out, results = _run_quick(tmp_path, "--claims", "textures=4,5")
  assert list(results["models"]) == ["textures/asyncpatch"]
  s = results["settings"]
  assert results["models"]["textures/asyncpatch"]["steps"] == s["train_steps"]
  steps = s["sample_steps"]

  guidance = results["claims"]["4"]["textures"]
  assert set(guidance["rows"]) == {"ω=0", "ω=1, k=0.5"}
  assert guidance["rows"]["ω=0"]["nfe"] == steps
  assert guidance["rows"]["ω=1, k=0.5"]["nfe"] == 2 * steps  # the guided branch doubles calls
  for row in guidance["rows"].values():
    assert _finite(row["lpips"], row["gram"], row["local_stats"], row["lpips_se"])
  assert _finite(*guidance["ground_truth"].values())
  assert [v for _, _, v in guidance["summary"]] and all(
      v in VERDICTS for _, _, v in guidance["summary"])

  accel = results["claims"]["5"]["textures"]
  budgets = [int(b) for b in s["nfe_budgets"].split(",")]
  assert set(accel["rows"]) == {f"{sampler}, N={b}" for b in budgets
                                for sampler in ("uniform", "uncertainty", "autoregressive")}
  for row in accel["rows"].values():
    _check_fid_row(row)
    assert row["nfe"] == row["budget"]  # every sampler spends exactly its budget
    assert (out / row["grid"]).exists()
  assert len(accel["summary"]) == len(budgets) + 1
  assert all(v in VERDICTS for _, _, v in accel["summary"])
  assert "claim5_fid_vs_nfe_textures.png" in results["plots"]


@pytest.mark.slow
def test_quick_every_claim_and_resume(tmp_path):
  """All six claims on MNIST at toy size: three networks, NFE bookkeeping of every sampler;
  then the same command again reuses every network and measurement and gives equal results."""
  claims = _load_claims()
  _, results = _run_quick(tmp_path)
  s = results["settings"]
  assert set(results["claims"]) == {"1", "2", "3", "4", "5", "6"}
  counts = {m["steps"] for m in results["models"].values()}
  assert counts == {s["train_steps"]}  # equal training compute
  control = f"conventional, {s['control_fraction']:g}× updates"
  for claim, names in (("1", {"asyncpatch", "conventional", control}),
                       ("2", {"asyncpatch", "iid"})):
    res = results["claims"][claim]["mnist"]
    assert set(res["rows"]) == names
    for row in res["rows"].values():
      _check_fid_row(row)
      assert _finite(row["bpd"], row["bpd_se"]) and row["bpd"] > 0
      assert row["nfe"] == s["sample_steps"]
    curve_steps = [s["train_steps"] // s["curve_points"] * (i + 1)
                   for i in range(s["curve_points"])]
    assert set(res["curves"]) == ({"asyncpatch", "conventional"} if claim == "1" else set())
    for curve in res["curves"].values():
      assert [p["updates"] for p in curve["fid"]] == curve_steps
      assert len({p["fid"] for p in curve["fid"]}) == len(curve_steps)  # distinct checkpoints
      assert curve["loss"] and all(_finite(v) for _, v in curve["loss"])
    assert all(v in VERDICTS for _, _, v in res["summary"])
  res1 = results["claims"]["1"]["mnist"]
  assert res1["rows"][control]["updates"] == round(s["control_fraction"] * s["train_steps"])
  # The control is the conventional run's checkpoint, the curve's point at that step.
  point = next(p for p in res1["curves"]["conventional"]["fid"]
               if p["updates"] == res1["rows"][control]["updates"])
  assert point["fid"] == res1["rows"][control]["fid"]
  inpaint = results["claims"]["3"]["mnist"]["rows"]
  assert set(inpaint) == set(s["masks"].split(","))
  t, jump, resample = (int(v) for v in s["repaint_paper"].split(","))
  for methods in inpaint.values():
    nfe = {label.split(" (")[0]: m["nfe"] for label, m in methods.items()
           if label.endswith("(conventional)")}
    assert methods["native (asyncpatch)"]["nfe"] == s["sample_steps"]
    assert nfe[f"RePaint paper T={t} j={jump} r={resample}"] == sampling.repaint_nfe(
        t, jump, resample)
    assert nfe[f"RePaint j={s['repaint_jump']} r={s['repaint_resample']}"] == (
        sampling.repaint_nfe(s["sample_steps"], s["repaint_jump"], s["repaint_resample"]))
    assert nfe["replacement, RePaint r=1"] == s["sample_steps"]
    assert all(_finite(m["lpips"], m["lpips_se"]) for m in methods.values())
  ar = results["claims"]["6"]["mnist"]
  for b in [int(b) for b in s["nfe_budgets"].split(",")]:
    assert ar["rows"]["sampling"][f"autoregressive, N={b}"]["nfe"] == b
  # More of the budget per group at --sample_steps: distinct, larger shares, each exactly N.
  half = claims.ar_kwargs(s["sample_steps"], (4, 4))["steps_per_group"]
  sweep = [label for label in ar["rows"]["sampling"] if label.endswith("steps per group")]
  per_group = [int(label.split(", ")[2].split()[0]) for label in sweep]
  assert sweep and per_group == sorted(set(per_group)) and min(per_group) > half
  assert all(ar["rows"]["sampling"][label]["nfe"] == s["sample_steps"] for label in sweep)
  assert sum("steps per group) / uniform" in c for c, _, _ in ar["summary"]) == len(sweep)
  for name, bounds in ar["rows"]["bits_per_dim"].items():
    for path in ("raster", "homogeneous"):
      assert _finite(bounds[path]["bpd"], bounds[path]["bpd_se"])
      assert ("bpd_diff" in bounds[path]) == (name != "asyncpatch")

  start = time.perf_counter()
  _, again = _run_quick(tmp_path)
  print(f"re-run from the stored workdir: {time.perf_counter() - start:.1f} s")
  def measured(claims):  # a claim's wall time is the only field a re-run changes
    return {c: {d: {k: v for k, v in res.items() if k != "seconds"} for d, res in per.items()}
            for c, per in claims.items()}

  assert measured(again["claims"]) == measured(results["claims"])
  assert again["models"] == results["models"]
  # Each call on the workdir is recorded, the earlier ones kept: the run's time is their sum.
  assert len(results["calls"]) == 1 and again["calls"][:1] == results["calls"]
  assert len(again["calls"]) == 2 and all(c["cpu"] for c in again["calls"])
  assert again["wall"].endswith("over the 2 calls on this workdir (each call reuses the "
                                "networks and measurements of the earlier ones)")


def test_bootstrap_fid_and_kid():
  """The point values are the library's FID and KID; a resample's KID equals the unbiased
  estimator on its explicit rows with pairs of copies left out; intervals cover the value."""
  from asyncpatch_jax.evaluation import fid as fid_lib

  claims = _load_claims()
  rng = np.random.default_rng(0)
  ref_features = rng.normal(size=(40, 6))
  reference = fid_lib.ReferenceStatistics("r", fid_lib.feature_statistics(ref_features),
                                          ref_features, "f")
  features = rng.normal(size=(40, 6)) + 0.3
  row = claims.fid_kid_bootstrap(features, reference, reps=50, seed=1)
  assert row["fid"] == pytest.approx(fid_lib.frechet_distance_to_features(features,
                                                                          reference.stats))
  kid, _ = fid_lib.kernel_inception_distance(features, ref_features, num_subsets=1,
                                             subset_size=40)
  assert row["kid"] == pytest.approx(kid, rel=1e-9)
  assert len(row["fid_boot"]) == len(row["kid_boot"]) == 50
  assert row["fid_lo"] <= row["fid"] <= row["fid_hi"] and row["kid_lo"] < row["kid_hi"]

  idx = np.random.default_rng(1).integers(0, 40, 40)  # the first resample of seed 1
  x, d = features[idx], 6
  kxx = (x @ x.T / d + 1) ** 3
  distinct = idx[:, None] != idx[None, :]
  kyy = (ref_features @ ref_features.T / d + 1) ** 3
  expect = (kxx[distinct].mean() + (kyy.sum() - np.trace(kyy)) / (40 * 39)
            - 2 * ((x @ ref_features.T / d + 1) ** 3).mean())
  # Replicates are re-centred on the estimate (duplicates bias a resample's FID upwards).
  assert row["fid_bias"] > 0
  assert row["kid_boot"][0] + row["kid_bias"] == pytest.approx(expect, rel=1e-9)
  assert row["fid_boot"][0] + row["fid_bias"] == pytest.approx(
      fid_lib.frechet_distance_to_features(features[idx], reference.stats))
  assert np.mean(row["fid_boot"]) == pytest.approx(row["fid"])


def test_verdicts_and_paired_differences():
  claims = _load_claims()
  assert claims.verdict(-2.0, -0.1) == "holds"
  assert claims.verdict(0.1, 2.0) == "fails"
  assert claims.verdict(-0.1, 0.1) == "not significant"
  assert claims.verdict(0.9, 1.2, holds_below=1.3) == "holds"
  assert claims.verdict(float("nan"), 1.0) == "not measurable"
  pair = claims.paired([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])
  assert pair["diff"] == pytest.approx(2.0)
  assert pair["se"] == pytest.approx(np.std([1, 2, 2, 3], ddof=1) / 2)
  assert pair["lo"] == pytest.approx(2.0 - 1.96 * pair["se"])
  w = claims.welch([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
  assert w["diff"] == pytest.approx(1.5) and w["se"] == pytest.approx(math.sqrt(1 / 3 + 0.25 / 3))
  assert w["hi"] - w["diff"] > 1.96 * w["se"]  # a t interval: wider than the normal one
  a = {"fid": 3.0, "fid_boot": [3.0, 4.0, 5.0] * 10}
  b = {"fid": 1.0, "fid_boot": [1.0, 1.0, 1.0] * 10}
  diff = claims.boot_difference(a, b)
  assert diff["diff"] == 2.0 and diff["lo"] == pytest.approx(2.0) and diff["hi"] == 4.0
  ratio = claims.boot_difference(a, b, ratio=True)
  assert ratio["ratio"] == 3.0 and ratio["lo"] == pytest.approx(3.0) and ratio["hi"] == 5.0


def test_claims_arguments(tmp_path):
  claims = _load_claims()
  assert claims.parse_plan(["mnist=2,1", "textures=4"]) == {"mnist": (1, 2), "textures": (4,)}
  for bad in (["cifar=1"], ["mnist"], ["mnist=7"], ["mnist=a"], ["mnist="]):
    with pytest.raises(ValueError, match="--claims"):
      claims.parse_plan(bad)
  for argv, message in (
      (["--masks", "box,circle"], "unknown mask"),
      (["--num_fid", "1"], "--num_fid"),
      (["--num_ref", "5000"], "training split has only 4500"),
      (["--elbo_examples", "600"], "test split has only 500"),
      (["--bootstrap", "10"], "--bootstrap 10"),
      (["--train_steps", "4001"], "multiple of --curve_points"),
      (["--control_fraction", "0.5"], "multiple of 1/--curve_points"),
      (["--num_fid", "200"], "more samples than dimensions"),
      (["--features", "inception"], "needs more samples than dimensions"),
      (["--nfe_budgets", "0,8"], "--nfe_budgets takes positive"),
      (["--guidance_levels", "1.5"], "--guidance_levels"),
      (["--repaint_paper", "250,10"], "--repaint_paper")):
    with pytest.raises(claims.FlagError, match=message):
      claims.parse_args(argv)
  quick = claims.parse_args(["--quick", "--features", "inception", "--out", "/tmp/x"])
  assert quick.features == "inception" and quick.sample_steps == claims.QUICK["sample_steps"]
  assert quick.workdir == os.path.join("/tmp/x", "work")

  # A workdir made with other settings is refused, naming each difference.
  args = claims.parse_args(["--quick", "--out", str(tmp_path)])
  claims.Store(args)
  again = claims.parse_args(["--quick", "--out", str(tmp_path), "--num_fid", "12",
                             "--train_minutes", "9"])
  with pytest.raises(claims.FlagError, match="--num_fid: workdir 16, now 12") as error:
    claims.Store(again)
  assert "train_minutes" not in str(error.value)  # a cap changes no measurement


def test_readme_claims_table_is_generated_from_the_results(tmp_path):
  """The README's table is `--render`'s output for results/claims/claims.json."""
  claims = _load_claims()
  with open(os.path.join(ROOT, "results", "claims", "claims.json")) as f:
    results = json.load(f)
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert claims.readme_table(results) in readme
  for word in ("holds", "fails", "not significant"):
    assert f"**{word}**" in readme or word not in claims.readme_table(results)
  path = tmp_path / "README.md"
  path.write_text(f"intro\n{claims.README_BEGIN}\nSTALE ROW\n{claims.README_END}\noutro\n")
  claims.update_readme(results, str(path))
  text = path.read_text()
  assert text.startswith("intro\n") and text.endswith("\noutro\n") and "STALE ROW" not in text
  path.write_text("no markers")
  with pytest.raises(ValueError, match="claims-table markers"):
    claims.update_readme(results, str(path))


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
