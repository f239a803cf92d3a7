"""Mixed-precision matmuls (models/precision.py) and the DiT's adaLN-single option.

bf16: the forward and gradients of `Linear`, `attention`, `gelu` and `add_bias` against
float32 references at bf16 tolerance, float32 gradients for float32 parameters; float32: bit for
bit the plain ops. adaLN-single: a valid, different architecture with DiT's adaLN-Zero start
(every block the identity), scalar levels ≡ homogeneous maps, slot path ≡ dense path, and its
FLOP count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import get_schedule
from asyncpatch_jax.models import precision
from asyncpatch_jax.train import validation

BF16 = jnp.bfloat16


def rand(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_bf16_linear_is_mixed_precision_with_float32_gradients():
  f32 = precision.Linear(16, 12, rngs=nnx.Rngs(0))
  bf16 = precision.Linear(16, 12, dtype=BF16, rngs=nnx.Rngs(0))
  nnx.update(f32, {"bias": nnx.Param(rand(12, seed=4))})
  nnx.update(bf16, nnx.state(f32))
  x = rand(2, 5, 16, seed=5)
  # float32: exactly nnx.Linear.
  plain = nnx.Linear(16, 12, rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(f32))
  np.testing.assert_array_equal(f32(x), plain(x))
  w = rand(2, 5, 12, seed=6)

  def grads(model, x):
    graphdef, params = nnx.split(model)
    return jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32) * w),
                    argnums=(0, 1))(params, x)

  (gp_ref, gx_ref), (gp, gx) = grads(f32, x), grads(bf16, x.astype(BF16))
  assert bf16(x.astype(BF16)).dtype == BF16 and gx.dtype == BF16
  assert rel_err(bf16(x.astype(BF16)), f32(x)) < 2e-2
  for ref, got in zip(jax.tree.leaves(gp_ref), jax.tree.leaves(gp), strict=True):
    assert got.dtype == jnp.float32
    assert rel_err(got, ref) < 2e-2
  assert rel_err(gx, gx_ref) < 2e-2


def test_add_bias_gradient_is_a_float32_sum():
  x, bias = rand(4, 6, 8).astype(BF16), rand(8, seed=1)
  gx, gb = jax.grad(lambda x, b: jnp.sum(precision.add_bias(x, b).astype(jnp.float32) ** 2),
                    argnums=(0, 1))(x, bias)
  y = x.astype(jnp.float32) + bias.astype(BF16).astype(jnp.float32)
  assert gb.dtype == jnp.float32 and gx.dtype == BF16
  assert rel_err(gb, np.sum(2 * np.asarray(y), axis=(0, 1))) < 2e-2


def test_bf16_attention_matches_float32_forward_and_backward():
  """Both bf16 forms (the inference primal and the training forward) and the gradient of the
  fused qkv against float32 attention; float32 inputs are exactly jax.nn's attention."""
  qkv = rand(2, 9, 3, 3, 8, seed=1)
  w = rand(2, 9, 3, 8, seed=2)

  def loss(attn, qkv):
    return jnp.sum(attn(qkv).astype(jnp.float32) * w)

  def reference(qkv):
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

  ref, ref_grad = jax.value_and_grad(loss, argnums=1)(reference, qkv)
  out = jax.jit(precision.attention)(qkv.astype(BF16))
  value, grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(
      precision.attention, qkv.astype(BF16))
  assert out.dtype == BF16 and out.shape == (2, 9, 3, 8) and grad.dtype == BF16
  assert rel_err(out, reference(qkv)) < 2e-2
  assert rel_err(value, ref) < 2e-2
  assert rel_err(grad, ref_grad) < 3e-2
  np.testing.assert_array_equal(precision.attention(qkv), reference(qkv))


def test_gelu_matches_flax_tanh_gelu_and_its_gradient():
  x = 3 * rand(4, 33, seed=7)
  ref, ref_grad = jax.value_and_grad(lambda x: jnp.sum(nnx.gelu(x, approximate=True) ** 2))(x)
  # The bf16 form's formula and hand-written derivative, evaluated in float32.
  value, grad = jax.value_and_grad(lambda x: jnp.sum(precision._mixed_gelu(x) ** 2))(x)
  np.testing.assert_allclose(precision._mixed_gelu(x), nnx.gelu(x, approximate=True),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)
  # bf16: within bf16 tolerance, bf16 gradient; float32: exactly flax's.
  gb = jax.grad(lambda x: jnp.sum(precision.gelu(x).astype(jnp.float32) ** 2))(x.astype(BF16))
  assert gb.dtype == BF16 and rel_err(gb, ref_grad) < 2e-2
  np.testing.assert_array_equal(precision.gelu(x), nnx.gelu(x, approximate=True))


def dit(adaln, seed=0, **kw):
  model = models.DiT(data_shape=(8, 8, 3), level_patch_size=2, hidden_size=32, depth=2,
                     num_heads=2, num_classes=5, adaln=adaln, schedule=get_schedule("cosine"),
                     rngs=nnx.Rngs(seed), **kw)
  return model


def randomise(model, seed=1):
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype), params))
  return model


def test_adaln_single_parameters_and_identity_start():
  block, single = dit("block"), dit("single")
  n_block = models.num_params(nnx.state(block, nnx.Param))
  n_single = models.num_params(nnx.state(single, nnx.Param))
  d = 32
  # Per block: −(d·6d + 6d) for the projection, +6d for the table; final: −(d·2d + 2d) + 2d;
  # +(d·6d + 6d) for the shared projection.
  assert n_block - n_single == 2 * d * 6 * d + d * 2 * d - d * 6 * d - 6 * d
  assert single.blocks[0].adaln is None and single.blocks[0].table.shape == (6 * d,)
  # adaLN-Zero start: the blocks are the identity, as DiT's.
  z, labels = rand(2, 8, 8, 3), jnp.array([1, 2])
  t = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4)), jnp.float32)
  x = single.patch_embed(models.dit.patchify(z, 2))
  cond = single.dense_conditioning(single.token_levels(t), single.class_embed(labels)[:, None])
  cond = single.shared_modulation(cond)
  np.testing.assert_array_equal(single.blocks[0](x, cond), x)


def test_adaln_single_paths_agree_and_flops():
  model = randomise(dit("single"))
  z, labels = rand(2, 8, 8, 3), jnp.array([1, 2])
  t = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4)), jnp.float32)
  hom = jnp.broadcast_to(t[:, :1, :1], t.shape)
  scalar = model(z, t[:, 0, 0], labels).output
  np.testing.assert_allclose(model(z, hom, labels, deterministic=False).output, scalar,
                             rtol=1e-5, atol=1e-5)
  two = jnp.where(jnp.arange(4)[None, :, None] < 2, 0.3, 0.7) * jnp.ones_like(t)
  np.testing.assert_allclose(model(z, two, labels).output,
                             model(z, two, labels, deterministic=False).output,
                             rtol=1e-5, atol=1e-5)
  per_token = model(z, t, labels).output
  assert float(jnp.abs(per_token - scalar).max()) > 1e-3  # the levels matter
  # DiT-S/2 on 32×32×4: per-token conditioning adds ~4% FLOPs (DiT's adaLN: ~47%).
  s2 = nnx.eval_shape(lambda: models.DiT(data_shape=(32, 32, 4), level_patch_size=2,
                                         num_classes=1000, adaln="single", rngs=nnx.Rngs(0)))
  assert 1.0 < s2.forward_flops() / s2.forward_flops(per_token=False) < 1.06


def test_adaln_single_bf16_trains_close_to_float32():
  ref, half = randomise(dit("single")), randomise(dit("single", dtype="bfloat16"))
  z, labels = rand(2, 8, 8, 3), jnp.array([1, 2])
  t = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4)), jnp.float32)

  def loss_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.value_and_grad(lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(
        z, t, labels, deterministic=False).output - z)))(params)

  (l32, g32), (l16, g16) = loss_grads(ref), loss_grads(half)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  np.testing.assert_allclose(l16, l32, rtol=0.03)
  flat32, flat16 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(g)]) for g in (g32, g16))
  assert rel_err(flat16, flat32) < 0.05


def test_adaln_option_is_validated():
  with pytest.raises(ValueError, match="unknown DiT adaln 'shared'"):
    dit("shared")
  from configs import base
  cfg = base.get_config("debug")
  cfg.model.dit.adaln = "per_token"
  with pytest.raises(ValueError, match=r"model\.dit\.adaln"):
    validation.validate_config(cfg)


def test_adaln_single_scanned_and_rematerialised_equals_unrolled():
  """The shared modulation passes through `nnx.scan` (broadcast) and `remat` unchanged."""
  from asyncpatch_jax.models.dit import stack_blocks

  unrolled = randomise(dit("single"))
  scanned = dit("single", scan_layers=True, remat="full")
  graphdef, _ = nnx.split(scanned)
  copy = nnx.merge(*nnx.split(unrolled))
  copy.blocks = stack_blocks(list(copy.blocks))
  scanned = nnx.merge(graphdef, nnx.state(copy))
  z, labels = rand(2, 8, 8, 3), jnp.array([1, 2])
  t = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4)), jnp.float32)
  for levels in (t, t[:, 0, 0]):
    np.testing.assert_allclose(scanned(z, levels, labels, deterministic=False).output,
                               unrolled(z, levels, labels, deterministic=False).output,
                               rtol=1e-5, atol=1e-5)


# The kernels switch (`model.kernels`): the CPU's custom-VJP forms vs the standard path.

def test_kernels_resolve_by_backend():
  assert precision.resolve_kernels("auto", "cpu") == "cpu"
  assert precision.resolve_kernels("auto", "gpu") == "standard"
  assert precision.resolve_kernels("auto", "tpu") == "standard"
  assert precision.resolve_kernels("standard", "cpu") == "standard"
  assert precision.resolve_kernels("cpu", "tpu") == "cpu"
  with pytest.raises(ValueError, match=r"unknown model\.kernels 'gpu'.*'auto', 'cpu', 'standard'"):
    precision.resolve_kernels("gpu")


def test_standard_attention_picks_cudnn_on_gpus_for_bf16_heads_it_supports(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert precision.standard_attention_impl(jnp.zeros((1, 4, 3, 2, 64), BF16)) == "cudnn"
  assert precision.standard_attention_impl(jnp.zeros((1, 4, 3, 2, 12), BF16)) == "xla"
  assert precision.standard_attention_impl(jnp.zeros((1, 4, 3, 2, 64), jnp.float32)) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert precision.standard_attention_impl(jnp.zeros((1, 4, 3, 2, 64), BF16)) == "xla"


def _loss_and_grads(model, z, t, labels):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    out = nnx.merge(graphdef, p, rest)(z, t, labels, deterministic=False).output
    return jnp.mean(jnp.square(out.astype(jnp.float32) - z))

  value_and_grad = jax.jit(jax.value_and_grad(loss))  # traced under the caller's kernels
  return value_and_grad(params), jax.make_jaxpr(jax.grad(loss))(params)


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_cpu_and_standard_kernels_compute_the_same_function(name):
  """A bf16 network under both kernels: the same loss and gradients within bf16 rounding; the
  'cpu' path traces the custom-VJP forms, the standard path none (plain autodiff)."""
  config = models.default_config()
  config.update(name=name, dtype="bfloat16", num_classes=5,
                dit=dict(size="S", hidden_size=32, depth=2, num_heads=2),
                unet=dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), norm_groups=8, num_heads=2, dropout=0.0))
  model = randomise(models.get_model(config, data_shape=(8, 8, 3), level_patch_size=2,
                                     schedule=get_schedule("cosine"), rngs=nnx.Rngs(0)), seed=3)
  z, labels = rand(2, 8, 8, 3), jnp.array([1, 2])
  t = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4)), jnp.float32)
  results = {}
  for kernels in ("cpu", "standard"):
    with precision.kernels_scope(kernels):
      results[kernels] = _loss_and_grads(model, z, t, labels)
  (l_cpu, g_cpu), jaxpr_cpu = results["cpu"]
  (l_std, g_std), jaxpr_std = results["standard"]
  assert "custom_vjp_call" in str(jaxpr_cpu) and "custom_vjp_call" not in str(jaxpr_std)
  np.testing.assert_allclose(l_std, l_cpu, rtol=0.02)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_std))
  flat_cpu, flat_std = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                        for g in (g_cpu, g_std))
  assert rel_err(flat_std, flat_cpu) < 0.05


def test_kernels_choice_is_logged_and_validated(caplog, monkeypatch):
  # The choice is logged when it changes: forget what earlier tests in this process logged.
  monkeypatch.setattr(precision, "_logged", None)
  config = models.default_config()
  config.update(name="dit", kernels="standard",
                dit=dict(size="S", hidden_size=32, depth=1, num_heads=2))
  # absl's logger has its own level, which an earlier test's flag parsing may have raised.
  with precision.kernels_scope("auto"), caplog.at_level("INFO", logger="absl"):
    models.get_model(config, data_shape=(8, 8, 3), level_patch_size=2, schedule=None,
                     rngs=nnx.Rngs(0))
    assert precision.active_kernels() == "standard"
  assert "precision kernels: standard (model.kernels='standard', backend cpu)" in caplog.text
  assert precision.active_kernels() == "cpu"  # the scope restored 'auto' on this CPU
  from configs import base
  cfg = base.get_config("debug")
  cfg.model.kernels = "gpu"
  with pytest.raises(validation.ConfigError, match=r"model\.kernels must be one of"):
    validation.validate_config(cfg)


def test_cudnn_attention_on_a_cpu_fails_at_start_up_naming_the_alternatives():
  from configs import base
  cfg = base.get_config("debug")
  cfg.model.attention_impl = "cudnn"
  cfg.model.dtype = "bfloat16"
  with pytest.raises(validation.ConfigError,
                     match=r"'cudnn' needs a GPU, but JAX's backend is 'cpu'; use None .* or "
                           r"'xla'"):
    validation.validate_config(cfg)
