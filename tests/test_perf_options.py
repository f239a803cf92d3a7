"""Tests of the speed options: rematerialisation and scanned DiT layers compute the same function
and gradients, attention through `jax.nn.dot_product_attention` is standard attention, the FLOP
counts and MFU arithmetic, and that importing the train step does not load TensorFlow."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import get_schedule
from asyncpatch_jax.models.dit import Attention, stack_blocks, unstack_blocks
from asyncpatch_jax.train import perf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = get_schedule("cosine")


def tiny(name: str, **overrides):
  config = models.default_config()
  config.update(name=name, num_classes=5, level_slots=0,
                unet=dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), norm_groups=8, num_heads=2, dropout=0.0),
                dit=dict(hidden_size=32, depth=3, num_heads=2))
  config.update(overrides)
  return config


def build(config, data_shape=(8, 8, 3), patch=2, seed=0, randomize=True):
  """The network; `randomize` draws every parameter from NumPy (zero-init layers would make
  equalities trivial). Equal seeds give equal models."""
  model = models.get_model(config, data_shape=data_shape, level_patch_size=patch,
                           schedule=SCHEDULE, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
  if randomize:
    rng = np.random.default_rng(seed + 1)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2] if x.ndim > 1
                                                                 else 25.0), x.dtype), params))
  return model


def inputs(model, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=(batch, *model.data_shape)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(batch, *model.level_grid)), jnp.float32)
  return z, t, jnp.arange(batch, dtype=jnp.int32) % 5


def loss_and_grads(model, z, t, labels):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    # Fresh RNG variables inside the trace, as the train step's ModelDef.merge makes them.
    model = nnx.merge(graphdef, params, jax.tree.map(jnp.array, rest))
    return jnp.mean(jnp.square(model(z, t, labels, deterministic=False).output - z))

  return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                       atol=atol), a, b)


@pytest.mark.parametrize("name,remat,dropout", [("dit", "dots_saveable", 0.0),
                                                 ("unet", "full", 0.2)])
def test_remat_gives_the_same_loss_and_gradients(name, remat, dropout):
  """Recomputation (with dropout: the same masks in the recomputed forward) changes nothing."""
  plain, checkpointed = tiny(name), tiny(name, remat=remat)
  for config in (plain, checkpointed):
    config.unet.dropout = dropout  # the U-Net's; the DiT has none
  plain, checkpointed = build(plain), build(checkpointed)
  assert checkpointed.remat == remat
  z, t, labels = inputs(plain)
  loss, grads = loss_and_grads(plain, z, t, labels)
  loss_r, grads_r = loss_and_grads(checkpointed, z, t, labels)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert_trees_close(grads_r, grads)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_scan_layers_initialises_as_the_unrolled_blocks_stacked():
  unrolled = build(tiny("dit"), randomize=False)
  scanned = build(tiny("dit", dit={"scan_layers": True}), randomize=False)
  assert jax.tree.leaves(nnx.state(scanned.blocks))[0].shape[0] == 3
  assert_trees_close(nnx.state(scanned.blocks, nnx.Param),
                     nnx.state(stack_blocks(list(unrolled.blocks)), nnx.Param), atol=0)
  back = unstack_blocks(scanned.blocks)
  assert_trees_close(nnx.state(back[2], nnx.Param), nnx.state(unrolled.blocks[2], nnx.Param),
                     atol=0)


def test_scan_layers_equals_unrolled():
  """Same weights, scanned or unrolled: the same outputs (per-token and scalar levels) and
  gradients (the scanned gradient is the unrolled one stacked)."""
  unrolled = build(tiny("dit"))
  scanned = build(tiny("dit", dit={"scan_layers": True}), randomize=False)
  graphdef, _ = nnx.split(scanned)
  copy = nnx.merge(*nnx.split(unrolled))
  copy.blocks = stack_blocks(list(copy.blocks))
  scanned = nnx.merge(graphdef, nnx.state(copy))  # fails if the trees differ
  z, t, labels = inputs(unrolled)
  for levels in (t, t[:, 0, 0]):
    np.testing.assert_allclose(scanned(z, levels, labels).output,
                               unrolled(z, levels, labels).output, rtol=1e-5, atol=1e-6)
  loss, grads = loss_and_grads(unrolled, z, t, labels)
  loss_s, grads_s = loss_and_grads(scanned, z, t, labels)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *[grads["blocks"][i] for i in range(3)])
  assert_trees_close(grads_s["blocks"], stacked)
  assert_trees_close(grads_s["final"], grads["final"])


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_attention_is_standard_multi_head_attention(implementation):
  """`jax.nn.dot_product_attention` (cuDNN on GPUs) against softmax(q kᵀ/√d) v written out."""
  attn = Attention(24, 3, dtype=jnp.float32, implementation=implementation, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 24)), jnp.float32)
  qkv = attn.qkv(x).reshape(2, 10, 3, 3, 8)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0), axis=-1)
  reference = attn.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 10, 24))
  np.testing.assert_allclose(attn(x), reference, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_gradients():
  model = build(tiny("dit", dtype="bfloat16", remat="full", dit={"scan_layers": True}))
  z, t, labels = inputs(model)
  loss, grads = loss_and_grads(model, z, t, labels)
  assert np.isfinite(float(loss))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  reference = build(tiny("dit"))
  loss_32, _ = loss_and_grads(reference, z, t, labels)
  np.testing.assert_allclose(loss, loss_32, rtol=0.05)


def test_bad_options_are_rejected():
  with pytest.raises(ValueError, match=r"unknown model.remat 'everything'"):
    build(tiny("dit", remat="everything"), randomize=False)
  with pytest.raises(ValueError, match="peak_tflops must be >= 0"):
    perf.peak_tflops(override=-1.0)


def test_analytic_dit_flops_match_xla():
  """The DiT's analytic train FLOPs (matmuls + attention) against XLA's count of a forward and
  backward pass, and DiT-S/2's published forward GFLOPs (6.06 at 256×256 images = 32×32×4
  latents; the per-token adaLN adds ~1.5×)."""
  model = build(tiny("dit", dit={"hidden_size": 64, "depth": 2}), data_shape=(16, 16, 4),
                randomize=False)
  z, t, labels = inputs(model, batch=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return jnp.mean(nnx.merge(graphdef, params, rest)(z, t, labels, deterministic=False).output)

  xla = perf.lowered_flops(jax.jit(jax.grad(loss)), params)
  assert xla is not None
  assert abs(model.train_flops(4) / xla - 1) < 0.05, (model.train_flops(4), xla)
  dit_s = nnx.eval_shape(lambda: build(tiny("dit", num_classes=1000,
                                            dit={"size": "S", "hidden_size": None, "depth": None,
                                                 "num_heads": None}),
                                       data_shape=(32, 32, 4), randomize=False))
  assert abs(dit_s.forward_flops(per_token=False) / 2 / 6.06e9 - 1) < 0.02
  assert 1.4 < dit_s.forward_flops() / dit_s.forward_flops(per_token=False) < 1.55


def test_peak_and_mfu_arithmetic():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind

  assert perf.peak_tflops(Device("NVIDIA H100 80GB HBM3")) == 989.0
  assert perf.peak_tflops(Device("NVIDIA H100 PCIe")) == 756.0
  assert perf.peak_tflops(Device("TPU v5 lite")) == 197.0
  assert perf.peak_tflops(Device("cpu")) is None
  assert perf.peak_tflops(Device("cpu"), override=5.0) == 5.0
  # 8 devices of 100 TFLOP/s, 400 TFLOP per step in 1 s: half the peak.
  assert perf.mfu(400e12, 1.0, 100.0, num_devices=8) == pytest.approx(0.5)
  assert perf.mfu(None, 1.0, 100.0) is None and perf.mfu(1e12, 1.0, None) is None


def test_step_throughput_reports_images_per_second_and_mfu():
  config = models.default_config()
  model = nnx.eval_shape(lambda: build(tiny("dit"), randomize=False))

  class Config:
    data = type("D", (), {"batch_size": 16})
    logging = type("L", (), {"peak_tflops": 1e-3})

  throughput = perf.StepThroughput(Config, model, num_devices=1)
  assert throughput.model_flops == model.train_flops(16)
  assert config.remat == "" and not config.dit.scan_layers
  jitted = jax.jit(lambda state, batch: (state + batch.sum(), batch))
  line = throughput.start(jitted, jnp.zeros(()), jnp.ones((16, 4)), step=1, now=10.0)
  assert "FLOPs per train step (batch 16)" in line and "XLA" in line
  out = throughput.report(11, now=12.0)  # 10 steps in 2 s
  assert out["perf/images_per_s"] == pytest.approx(80.0)
  assert out["perf/mfu"] == pytest.approx(model.train_flops(16) / 0.2 / 1e9)
  assert throughput.report(11, now=13.0) == {}


def test_importing_the_train_step_does_not_load_tensorflow():
  code = ("import sys; import asyncpatch_jax.train.step; "
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'grain') "
          "if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, XLA_FLAGS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
