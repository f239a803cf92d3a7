"""FLOPs per train step, accelerator peak FLOP/s and model FLOPs utilisation (MFU).

Two FLOP counts: the model's analytic count where the network has one (`model.train_flops`,
e.g. the DiT's 6·params·tokens-style count with attention; rematerialisation not included, the
usual definition of MFU), and XLA's cost analysis of the compiled step (everything the program
executes, recomputation included, for one device of an SPMD program). MFU divides the model's
FLOPs per second per device by the device's dense bf16 peak (`PEAK_TFLOPS`, or
`config.logging.peak_tflops` when set); on a device not in the table (CPUs) there is no MFU.
"""

from __future__ import annotations

import platform
from typing import Any

import jax

# Dense (non-sparse) bf16 matmul peaks in TFLOP/s per JAX device, matched as substrings of
# `device.device_kind` in this order (more specific names first). TPU v2/v3 expose each of a
# chip's two TensorCores as a device; later TPUs and GPUs one device per chip.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L4", 121.0), ("A10G", 70.0), ("V100", 125.0),
    ("TPU v2", 22.5), ("TPU v3", 61.5), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0), ("TPU7x", 2307.0),
)


def peak_tflops(device: jax.Device | None = None, override: float = 0.0) -> float | None:
  """The device's peak TFLOP/s: `override` if > 0, else from `PEAK_TFLOPS`, else None."""
  if override and float(override) > 0:
    return float(override)
  if override and float(override) < 0:
    raise ValueError(f"logging.peak_tflops must be >= 0 (0: from the device table), got "
                     f"{override}")
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_TFLOPS:
    if name in kind:
      return peak
  return None


def host_cpu() -> str:
  """The host CPU's model and the matrix extensions that decide CPU matmul speed ('AMX',
  'AVX-512 BF16', else 'AVX2'/'AVX-512'), for benchmark records: CPU timings, and PyTorch's
  bf16 speed most of all (oneDNN without AMX or AVX-512 BF16 is slow), depend on them."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  extensions = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                        ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
  model = model or platform.processor() or platform.machine()
  return f"{model} ({', '.join(extensions)})" if extensions else model


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled program (per device under SPMD), from XLA; None if the
  backend gives no estimate."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend / program implements it
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis or analysis["flops"] <= 0:
    return None
  return float(analysis["flops"])


def model_train_flops(model: Any, batch_size: int) -> float | None:
  """The network's analytic FLOPs of one train step on `batch_size` examples (all devices), or
  None if the network has no analytic count."""
  count = getattr(model, "train_flops", None)
  return None if count is None else float(count(batch_size))


def mfu(flops_per_step: float | None, seconds_per_step: float, peak: float | None,
        num_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: `flops_per_step` (all devices) / time / (`num_devices` · peak)."""
  if not flops_per_step or not peak or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / (num_devices * peak * 1e12)


def lowered_flops(jitted: Any, *args: Any) -> float | None:
  """XLA's FLOPs of one call of `jitted(*args)` for the whole program (all devices), from the
  lowered HLO: no compilation (a later call compiles as usual)."""
  try:
    lowered = jitted.lower(*args)
  except Exception:  # lowering errors surface, with their message, at the real call
    return None
  return compiled_flops(lowered)


class StepThroughput:
  """Throughput and MFU lines for the training log.

  `start(...)` after the first step (compiled) logs the FLOPs per step once; `report(step)` at
  each log step returns images/s and MFU (when the peak is known) since the previous report.
  """

  def __init__(self, config: Any, model: Any, num_devices: int | None = None):
    self.batch_size = int(config.data.batch_size)
    self.num_devices = int(num_devices or jax.device_count())
    self.peak = peak_tflops(jax.devices()[0], float(config.logging.peak_tflops))
    self.model_flops = model_train_flops(model, self.batch_size)
    self.flops: float | None = None
    self.last: tuple[int, float] | None = None

  def start(self, jitted_step: Any, state: Any, batch: Any, step: int, now: float) -> str:
    """Counts the step's FLOPs; returns the log line (model and XLA counts, device peak)."""
    xla = lowered_flops(jitted_step, state, batch)
    self.flops = self.model_flops or xla
    self.last = (step, now)
    fmt = lambda f: "n/a" if f is None else f"{f / 1e12:.4g} TFLOP"
    peak = "unknown (no MFU; set logging.peak_tflops)" if self.peak is None else (
        f"{self.peak:g} TFLOP/s per device")
    return (f"FLOPs per train step (batch {self.batch_size}): model {fmt(self.model_flops)}, "
            f"XLA {fmt(xla)}; peak {peak}; {self.num_devices} device(s)")

  def report(self, step: int, now: float) -> dict[str, float]:
    """`perf/images_per_s`, `perf/tflops_per_s_per_device` and `perf/mfu` since the last call."""
    if self.last is None or step <= self.last[0] or now <= self.last[1]:
      return {}
    seconds = (now - self.last[1]) / (step - self.last[0])
    self.last = (step, now)
    out = {"perf/images_per_s": self.batch_size / seconds}
    if self.flops:
      out["perf/tflops_per_s_per_device"] = self.flops / seconds / self.num_devices / 1e12
      value = mfu(self.flops, seconds, self.peak, self.num_devices)
      if value is not None:
        out["perf/mfu"] = value
    return out
