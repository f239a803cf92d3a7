"""Smoke test of benchmarks/throughput.py: every part runs at tiny sizes and writes its JSON."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_throughput_quick(tmp_path):
  """Runs the script as a user would: its own process on one CPU device (the tests' 8 fake
  devices would make every train-step compile an 8-way SPMD one)."""
  torch_available = importlib.util.find_spec("torch") is not None
  out = tmp_path / "throughput.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  argv = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
          "--skip", "scan_compile", "--out", str(out)]
  argv += ["--torch", "--torch_bf16"] if torch_available else []
  start = time.perf_counter()
  proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  elapsed = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| case |" in proc.stdout
  print(f"quick run: {elapsed:.1f} s (< 60 s on an idle 2-core CPU)")
  data = json.loads(out.read_text())
  assert len(data) == 1
  entry = next(iter(data.values()))
  for case in entry["train"].values():
    assert case["images_per_s"] > 0 and case["compile_s"] > 0 and case["cpu_s"] >= 0
    # The DiT's analytic count agrees with XLA's (matmuls + attention vs every op).
    assert 0.9 < case["model_flops_per_step"] / case["xla_flops_per_step"] < 1.1
    assert case["mfu"] is None  # no peak for a CPU
  assert len(entry["asynchrony"]) == 5
  assert entry["sampling"]["nfe"] == 2 and entry["sampling"]["nfe_per_s"] > 0
  plans = entry["sampling_plans"]
  assert 1 <= plans["adaptive"]["nfe"] <= 2
  assert plans["autoregressive"]["nfe"] == 2  # 4 groups: o_3 + S = ⌊3·S/2⌋ + S with S = 1
  assert all(p["cpu_s_per_nfe"] > 0 for p in plans.values())
  assert entry["memory"]["peak_bytes"] > 0
  if sys.platform == "linux":  # re-run with transparent huge pages for XLA's temporaries
    assert "glibc.malloc.hugetlb=1" in entry["glibc_tunables"]
  if torch_available:  # PyTorch in its own worker process, float32 and under bf16 autocast
    assert entry["torch"]["images_per_s"] > 0 and entry["torch"]["precision"] == "float32"
    assert entry["torch bf16"]["precision"] == "bfloat16 autocast"
    assert entry["torch bf16"]["cpu_s"] > 0
    assert "ours / PyTorch DiT images/s (wall)" in entry["summary"]
    assert "ours / PyTorch DiT under bf16 autocast, images/s (wall)" in entry["summary"]


def test_torch_dit_shapes():
  torch = pytest.importorskip("torch")
  torch_dit = _load("torch_dit")
  model = torch_dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                        num_heads=2, num_classes=10)
  out = model(torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,)))
  assert tuple(out.shape) == (3, 8, 8, 8)
  step = torch_dit.make_train_step(model)
  assert torch.isfinite(step(torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))))
  step = torch_dit.make_train_step(model, autocast=True)
  assert torch.isfinite(step(torch.randn(3, 4, 8, 8), torch.randint(0, 10, (3,))))


def test_torch_worker_protocol():
  """The worker answers one timing per 'step' and exits at end of input."""
  pytest.importorskip("torch")
  throughput = _load("throughput")
  args = throughput.parse_args(["--quick", "--image_size", "8", "--batch", "2",
                                "--num_classes", "10"])
  worker = throughput.TorchWorker(args)
  try:
    assert worker.info["precision"] == "float32" and worker.info["threads"] >= 1
    timing = worker()
    assert timing.wall_s > 0 and timing.cpu_s > 0
  finally:
    worker.close()
  assert worker.process.returncode == 0
