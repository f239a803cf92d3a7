"""benchmarks/device_check.py: its figures from hand-made results, and (slow) every part at toy
size on the CPU, as `benchmarks/device_check.sh --tiny` runs it."""

import json
import os
import subprocess

import pytest

from benchmarks import device_check as dc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(batch, wall_s, compile_s=10.0):
  return {"batch": batch, "wall_s": wall_s, "compile_s": compile_s, "images_per_s": batch / wall_s,
          "mfu": 0.4, "tflops_per_s": 1.0, "kernels": "standard", "adaln": "single"}


def test_summary_and_table_from_hand_made_results():
  entry = {
      "backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.0,
      "train": {"DiT-B/2": _train(256, 0.5), "DiT-XL/2": _train(64, 0.4, compile_s=90.0)},
      "kernels": {**_train(256, 0.75), "kernels": "cpu"},
      "overhead": {"single": {"fwd+bwd, per-token map": {"wall_s": 0.33},
                              "fwd+bwd, one level per image [B]": {"wall_s": 0.30}}},
      "memory": [{"batch": 64, "remat": "off", "scan_layers": True, "compile_s": 20.0,
                  "peak_estimate_bytes": 2.0**31},
                 {"batch": 64, "remat": "full", "scan_layers": True, "compile_s": 22.0,
                  "peak_estimate_bytes": 2.0**30}],
      "sampling": {"nfe_per_s": 123.0},
      "inception": {"images_per_s": 456.0},
      "skipped": ["nothing"],
  }
  s = dc.summary(entry)
  assert s["DiT-B/2 step: 'cpu' kernels / standard, wall time"] == pytest.approx(1.5)
  assert s["per-token overhead fwd+bwd (DiT-B/2, adaln=single), wall"] == pytest.approx(1.1)
  assert s["DiT-XL/2 compile s, unrolled"] == 90.0
  assert s["DiT-XL/2 compile s, scan_layers"] == 20.0  # XL's batch, no remat
  assert s["DiT-XL/2 sampling NFE/s"] == 123.0 and s["FID Inception images/s"] == 456.0
  entry["summary"] = s
  text = dc.table(entry)
  assert "| DiT-B/2 ('cpu' kernels) adaln=single | 256 | cpu |" in text
  assert "| | 64 | full | True | 22.0 | 1.00 |" in text
  assert "skipped (over budget or --skip): nothing" in text
  assert dc.device_name(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3",
                                       "platform": "gpu"})()) == "nvidia_h100_80gb_hbm3"


@pytest.mark.slow
def test_device_check_tiny_runs_every_part(tmp_path):
  """Its own process on one CPU device, as a user runs it (the tests' 8 fake devices would make
  every compile an SPMD one)."""
  out = tmp_path / "device_check.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", DEVICE_CHECK_TIMEOUT_S="3000")
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--tiny", "--budget_s",
       "100000", "--out", str(out)], env=env, capture_output=True, text=True, timeout=3000)
  assert result.returncode == 0, result.stderr[-3000:]
  entry = json.loads(out.read_text())["tiny"]
  assert not entry["skipped"]
  assert set(entry["train"]) == {"DiT-B/2", "DiT-XL/2"} and entry["kernels"]["kernels"] == "cpu"
  assert entry["train"]["DiT-B/2"]["kernels"] == "cpu"  # 'auto' on a CPU
  assert entry["sampling"]["nfe"] > 0 and entry["inception"]["images_per_s"] > 0
  assert {r["remat"] for r in entry["memory"]} == {"off", "full"}
  assert "| figure | value |" in result.stdout
