"""Tests of the networks: shapes, zero init, per-token vs scalar levels, the slot path, DiT's
parameter counts, sharded vs single-device passes, bad inputs, the denoiser adapter and CFG."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import Prediction, get_schedule, to_prediction
from asyncpatch_jax.diffusion.parametrization import log_x0_error_scale
from asyncpatch_jax.models.common import avg_pool_spatial
from asyncpatch_jax.models.dit import patchify, unpatchify

SCHEDULE = get_schedule("cosine")
NUM_CLASSES = 5


def tiny_config(name: str, **overrides):
  config = models.default_config()
  config.name = name
  config.num_classes = NUM_CLASSES
  config.unet.update(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), norm_groups=8, num_heads=2, dropout=0.0)
  config.dit.update(size="S", hidden_size=32, depth=2, num_heads=2)
  config.level_slots = 0  # one compiled path; the tests of the path switch turn the slots on
  config.update(overrides)
  return config


def build(config, data_shape, level_patch_size, seed=0, randomize=True):
  """The model; `randomize` fills every parameter with random values (fan-in scaled normals),
  so zero-initialised layers don't make equalities trivial.

  Random parameters come from NumPy on the abstract model (no XLA compile per shape); the real
  initialisation uses the cheap-to-compile 'rbg' PRNG. Equal seeds give equal parameters.
  """
  def make():
    return models.get_model(config, data_shape=data_shape, level_patch_size=level_patch_size,
                            schedule=SCHEDULE, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))

  if not randomize:
    return make()
  graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  rng = np.random.default_rng(seed + 1)

  def random_param(x):
    std = 1.0 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim >= 2 else 0.2
    return jnp.asarray(rng.normal(size=x.shape) * std, x.dtype)

  def concrete(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed, impl="rbg")
    return jnp.zeros(x.shape, x.dtype)

  return nnx.merge(graphdef, jax.tree.map(random_param, params), jax.tree.map(concrete, rest))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply(graphdef, state, z, t, labels, deterministic):
  return nnx.merge(graphdef, state)(z, t, labels, deterministic=deterministic)


def apply(model, z, t, labels=None, deterministic=True):
  """The model's forward pass under jit (one compile per configuration, shared across tests)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, z, t, labels, deterministic)


def grid_of(data_shape, p):
  return tuple(s // p for s in data_shape[:-1])


def inputs(data_shape, p, batch=2, seed=0):
  kz, kt, ky = jax.random.split(jax.random.key(seed), 3)
  z = jax.random.normal(kz, (batch, *data_shape))
  t = jax.random.uniform(kt, (batch, *grid_of(data_shape, p)))
  labels = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
  return z, t, labels


def few_level_map(data_shape, p, batch=2, seed=0):
  """An inpainting-like map per example: known tokens at 0, the rest at one or two levels."""
  grid = grid_of(data_shape, p)
  k1, k2 = jax.random.split(jax.random.key(seed))
  choice = jax.random.randint(k1, (batch, *grid), 0, 3)
  levels = jax.random.uniform(k2, (batch, 1, 2), minval=0.05, maxval=1.0)
  levels = jnp.concatenate([jnp.zeros((batch, 1, 1)), levels], axis=-1)
  return jnp.take_along_axis(levels, choice.reshape(batch, 1, -1), axis=-1).reshape(choice.shape)


def assert_close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(np.abs(b).max(), 1e-3)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale * 10)


# (model name, data_shape, level patch, extra config) covering 1-D/2-D, pixel/patch levels.
CASES = [
    ("unet", (8, 8, 3), 1, {"uncertainty": True}),
    ("unet", (8, 8, 3), 4, {}),
    ("unet", (16, 2), 1, {}),
    ("unet", (16, 2), 2, {"uncertainty": True}),
    ("dit", (8, 8, 3), 1, {"dit": {"patch": 1}}),
    ("dit", (8, 8, 3), 2, {"dit": {"patch": 2}, "uncertainty": True}),
    ("dit", (8, 8, 3), 4, {"dit": {"patch": 2}}),
    ("dit", (16, 2), 2, {"dit": {"patch": 2}, "uncertainty": True}),
]
CASE_IDS = [f"{n}-{len(s) - 1}d-p{p}-{o}" for n, s, p, o in CASES]


# ---------------------------------------------------------------------------------------------
# Distinct-level slots.


def test_find_level_slots_reconstructs_every_map():
  levels = jnp.array([[0.3, 0.0, 0.3, 0.7, 0.0, 0.7],
                      [0.5] * 6,
                      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
  slots = models.find_level_slots(levels, 3)
  np.testing.assert_array_equal(slots.num_distinct, [3, 1, 6])
  assert not bool(slots.fits)
  # Examples that fit are reconstructed exactly; values are sorted and distinct.
  for b in range(2):
    recon = slots.values[b][slots.index[b]]
    np.testing.assert_array_equal(recon, levels[b])
  np.testing.assert_array_equal(slots.values[0], np.float32([0.0, 0.3, 0.7]))
  assert bool(models.find_level_slots(levels[:2], 3).fits)
  # Randomised few-level maps under jit.
  t = few_level_map((16, 16, 1), 1, batch=4, seed=3).reshape(4, -1)
  slots = jax.jit(models.find_level_slots, static_argnums=1)(t, 3)
  assert bool(slots.fits)
  np.testing.assert_array_equal(jnp.take_along_axis(slots.values, slots.index, 1), t)
  np.testing.assert_array_equal(slots.num_distinct,
                                [len(np.unique(np.asarray(row))) for row in t])


def test_patchify_round_trip_and_pooling():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  tokens = patchify(x, 4)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(tokens[0, 1], x[0, :4, 4:8].reshape(-1))  # row-major tokens
  np.testing.assert_array_equal(unpatchify(tokens, (2, 3), 4), x)
  pooled = avg_pool_spatial(x, 4)
  np.testing.assert_allclose(pooled[1, 1, 2], x[1, 4:8, 8:12].mean(axis=(0, 1)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Shapes and initialisation.


@pytest.mark.parametrize("name,data_shape,p,overrides", CASES, ids=CASE_IDS)
def test_output_shapes(name, data_shape, p, overrides):
  z, t, labels = inputs(data_shape, p)
  model = build(tiny_config(name, **overrides), data_shape, p)
  out = apply(model, z, t, labels)
  assert isinstance(out, models.ModelOutput)
  assert out.output.shape == z.shape and out.output.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out.output)))
  if overrides.get("uncertainty"):
    assert out.log_variance.shape == z.shape
    assert bool(jnp.all(jnp.isfinite(out.log_variance)))
  else:
    assert out.log_variance is None
  assert apply(model, z, t[:1], labels).output.shape == z.shape  # a batch-1 map broadcasts


@pytest.mark.parametrize("name", ["unet", "dit"])
@pytest.mark.parametrize("parametrization", ["eps", "x0", "v"])
def test_zero_prediction_at_init(name, parametrization):
  """Zero-init output layers: output 0; the log-variance is the zero prediction's x0 error."""
  data_shape, p = (8, 8, 3), 2
  model = build(tiny_config(name, uncertainty=True, parametrization=parametrization),
                data_shape, p, randomize=False)
  z, t, labels = inputs(data_shape, p)
  out = apply(model, z, t, labels)
  np.testing.assert_array_equal(out.output, 0.0)
  lam = SCHEDULE.log_snr(jnp.repeat(jnp.repeat(t, p, 1), p, 2))[..., None]
  expected = jnp.broadcast_to(log_x0_error_scale(lam, parametrization), z.shape)
  np.testing.assert_allclose(out.log_variance, expected, rtol=1e-5, atol=1e-5)


def test_zero_init_is_calibrated_for_unit_data():
  """At init, exp(log_variance) is E‖x̂0 − x0‖² of the zero prediction on N(0, 1) data."""
  data_shape, p = (8, 8, 1), 8
  for parametrization in ("eps", "v", "x0"):
    model = build(tiny_config("dit", uncertainty=True, parametrization=parametrization,
                              dit={"patch": 8}), data_shape, p, randomize=False)
    k1, k2 = jax.random.split(jax.random.key(parametrization == "v"))
    x0 = jax.random.normal(k1, (4096, *data_shape))
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.full((4096, 1, 1), 0.3)
    alpha, sigma = SCHEDULE.alpha_sigma(t[..., None])
    z = alpha * x0 + sigma * eps
    out = apply(model, z, t)
    pred = to_prediction(out.output, z, t, schedule=SCHEDULE, parametrization=parametrization,
                         patch_size=p, log_variance=out.log_variance)
    mse = float(jnp.mean((pred.x0 - x0) ** 2))
    np.testing.assert_allclose(mse, float(pred.variance.mean()), rtol=0.03)


# ---------------------------------------------------------------------------------------------
# Per-token conditioning: homogeneous maps, scalar levels, the slot path and its fallback.


@pytest.mark.parametrize("name,data_shape,p,overrides", [CASES[1], CASES[2], CASES[6]],
                         ids=[CASE_IDS[i] for i in (1, 2, 6)])
def test_homogeneous_map_equals_scalar_levels(name, data_shape, p, overrides):
  z, _, labels = inputs(data_shape, p)
  levels = jnp.array([0.17, 0.83])
  t_map = jnp.broadcast_to(levels.reshape(2, *(1,) * (len(data_shape) - 1)),
                           (2, *grid_of(data_shape, p)))
  scalar = build(tiny_config(name, uncertainty=True, **overrides), data_shape, p)
  reference = apply(scalar, z, levels, labels)
  # The dense per-token path, and the path switch (which takes the scalar-level network).
  for level_slots in (0, 4):
    model = build(tiny_config(name, uncertainty=True, level_slots=level_slots, **overrides),
                  data_shape, p)
    out = apply(model, z, t_map, labels)
    assert_close(out.output, reference.output)
    assert_close(out.log_variance, reference.log_variance)
  assert float(jnp.abs(reference.output).max()) > 0.1  # not trivially zero


@pytest.mark.parametrize("name,data_shape,p,overrides",
                         [CASES[0], CASES[3], CASES[5], CASES[6]],
                         ids=[CASE_IDS[i] for i in (0, 3, 5, 6)])
def test_slot_path_equals_dense_path(name, data_shape, p, overrides):
  """The same function: a few distinct levels (slot path) and many (dense fallback)."""
  z, t_many, labels = inputs(data_shape, p)
  t_few = few_level_map(data_shape, p)
  fast = build(tiny_config(name, level_slots=3, **overrides), data_shape, p)
  dense = build(tiny_config(name, level_slots=0, **overrides), data_shape, p)
  forward = lambda m, z, t, y: apply(m, z, t, y).output
  assert bool(models.find_level_slots(t_few.reshape(2, -1), 3).fits)
  assert not bool(models.find_level_slots(t_many.reshape(2, -1), 3).fits)
  for t in (t_few, t_many):
    assert_close(forward(fast, z, t, labels), forward(dense, z, t, labels))
  # Per-token levels matter: the few-level and random maps give different predictions.
  assert float(jnp.abs(forward(dense, z, t_few, labels) - forward(dense, z, t_many, labels))
               .max()) > 1e-3


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_slot_path_called_directly_matches_dense(name):
  """The slot path itself (no switch, no fallback) on few-level and homogeneous maps."""
  data_shape, p = (8, 8, 3), 2
  graphdef, state = nnx.split(build(tiny_config(name, level_slots=3), data_shape, p))
  z, _, labels = inputs(data_shape, p)

  @functools.partial(jax.jit, static_argnums=0)
  def run(path, state, z, t, labels):
    m = nnx.merge(graphdef, state)
    if name == "dit":
      y, t_tokens = m.class_embed(labels)[:, None], m.token_levels(t)
      if path == "slots":
        cond = m.slot_conditioning(models.find_level_slots(t_tokens, 3), y)
        assert cond.rows.shape == (2, 3, 32) and cond.index.shape == (2, 16)
      else:
        cond = m.dense_conditioning(t_tokens, y)
      return m.forward_tokens(z, cond)
    y = m.class_embed(labels)
    if path == "slots":
      conds = m.slot_conditions(t, models.find_level_slots(t.reshape(2, -1), 3), y)
    else:
      conds = m.dense_conditions(t, y)
    return m.forward(z, conds, True)

  homogeneous = jnp.broadcast_to(jnp.array([0.3, 0.6])[:, None, None], (2, 4, 4))
  for t in (few_level_map(data_shape, p), homogeneous):
    assert bool(models.find_level_slots(t.reshape(2, -1), 3).fits)
    assert_close(run("slots", state, z, t, labels), run("dense", state, z, t, labels))


def test_class_conditioning_and_null_label():
  data_shape, p = (8, 8, 3), 2
  for name in ("unet", "dit"):
    model = build(tiny_config(name), data_shape, p)
    z, t, labels = inputs(data_shape, p)
    a = apply(model, z, t, labels).output
    b = apply(model, z, t, (labels + 1) % NUM_CLASSES).output
    null = apply(model, z, t, jnp.full_like(labels, NUM_CLASSES)).output
    assert float(jnp.abs(a - b).max()) > 1e-3
    assert_close(apply(model, z, t).output, null)  # labels=None is the null class


def test_log_snr_embedding_and_bfloat16():
  data_shape, p = (8, 8, 3), 2
  z, t, labels = inputs(data_shape, p)
  for name in ("unet", "dit"):
    ref = build(tiny_config(name, level_embedding="log_snr"), data_shape, p)
    low = build(tiny_config(name, level_embedding="log_snr", dtype="bfloat16"), data_shape, p)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(low, nnx.Param)))
    a, b = apply(ref, z, t, labels).output, apply(low, z, t, labels).output
    assert b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert rel < 0.05, rel


def test_unet_dropout_only_in_training():
  data_shape, p = (8, 8, 3), 1
  config = tiny_config("unet")
  config.unet.dropout = 0.5
  model = build(config, data_shape, p)
  z, t, labels = inputs(data_shape, p)
  eval_a, eval_b = apply(model, z, t, labels), apply(model, z, t, labels)
  np.testing.assert_array_equal(eval_a.output, eval_b.output)
  train = apply(model, z, t, labels, deterministic=False)
  assert float(jnp.abs(train.output - eval_a.output).max()) > 1e-3


def test_gradients_reach_zero_initialised_layers():
  """adaLN-Zero / zero-init convs still get gradients at init (as in DiT and ADM)."""
  data_shape, p = (8, 8, 3), 2
  z, t, labels = inputs(data_shape, p)
  for name, last in (("dit", ("final", "linear", "kernel")), ("unet", ("out_conv", "kernel"))):
    model = build(tiny_config(name), data_shape, p, randomize=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, graphdef=graphdef, rest=rest):
      m = nnx.merge(graphdef, params, rest)
      return jnp.mean((m(z, t, labels, deterministic=False).output - z) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    g = grads
    for key in last:
      g = g[key]
    assert float(jnp.abs(g[...]).max()) > 0


# ---------------------------------------------------------------------------------------------
# DiT sizes.


def dit_reference_count(hidden, depth, patch, tokens, in_ch=4, out_ch=8, classes=1000):
  """Parameters of the official PyTorch DiT (learn_sigma, CFG table, frozen pos_embed counted)."""
  d = hidden
  block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) \
      + (d * 6 * d + 6 * d)
  return ((patch * patch * in_ch * d + d) + (256 * d + d + d * d + d) + (classes + 1) * d
          + tokens * d + depth * block + (d * 2 * d + 2 * d)
          + (d * patch * patch * out_ch + patch * patch * out_ch))


@pytest.mark.parametrize("size,published", [("S", 33.0), ("B", 130.5), ("L", 458.1),
                                            ("XL", 675.1)])
def test_dit_parameter_counts(size, published):
  config = models.default_config()
  config.update(name="dit", dit={"size": size, "patch": 2}, num_classes=1000, uncertainty=True)
  model = nnx.eval_shape(lambda: models.get_model(config, data_shape=(32, 32, 4),
                                                  level_patch_size=2, schedule=SCHEDULE,
                                                  rngs=nnx.Rngs(0)))
  count = models.num_params(nnx.state(model, nnx.Param))
  hidden, depth, _ = models.DIT_SIZES[size]
  # Our position embedding is a constant, not a parameter; DiT stores it as a frozen one.
  reference = dit_reference_count(hidden, depth, 2, 256)
  assert count + 256 * hidden == reference
  assert round(reference / 1e6, 1) == published
  if size == "XL":
    assert reference == 675_129_632  # DiT-XL/2 as printed by the official code


# ---------------------------------------------------------------------------------------------
# Sharding: batch on 'data', parameters fsdp-sharded; equal to the single-device pass.


def fsdp_spec(x, axis_size):
  """The largest axis of a >= 2-D parameter divisible by the fsdp size goes on 'fsdp'."""
  if x.ndim < 2:
    return P()
  candidates = [a for a in range(x.ndim) if x.shape[a] % axis_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda a: x.shape[a])
  return P(*[("fsdp" if a == axis else None) for a in range(x.ndim)])


@pytest.mark.parametrize("name,data_shape,p,overrides", [CASES[1], CASES[6]],
                         ids=[CASE_IDS[1], CASE_IDS[6]])
def test_sharded_forward_matches_single_device(name, data_shape, p, overrides):
  assert jax.device_count() >= 8, "tests/conftest.py should give 8 CPU devices"
  # Automatic (GSPMD) axes, as asyncpatch_jax/train/mesh.py builds them.
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  model = build(tiny_config(name, uncertainty=True, level_slots=4, **overrides), data_shape, p)
  graphdef, state = nnx.split(model)
  z, t_many, labels = inputs(data_shape, p, batch=8)
  t_few = few_level_map(data_shape, p, batch=8)

  def forward(state, z, t, labels):
    out = nnx.merge(graphdef, state)(z, t, labels)
    return out.output, out.log_variance

  single = jax.jit(forward)
  state_sharding = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x, 2)), state)
  sharded_state = jax.device_put(state, state_sharding)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(state_sharding))
  batch = NamedSharding(mesh, P("data"))
  sharded = jax.jit(forward, out_shardings=(batch, batch))
  t_homogeneous = jnp.broadcast_to(t_many[:, :1, :1], t_many.shape)
  # The homogeneous, slot and dense paths of the same compiled function.
  for t in (t_homogeneous, t_few, t_many):
    args = [jax.device_put(a, batch) for a in (z, t, labels)]
    out = sharded(sharded_state, *args)
    assert out[0].sharding.spec == P("data")
    ref = single(state, z, t, labels)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_configs_raise_clear_errors():
  with pytest.raises(ValueError, match=r"unknown model.name 'vit'.*\['dit', 'unet'\]"):
    build(tiny_config("vit"), (8, 8, 3), 1)
  with pytest.raises(ValueError, match=r"size 30, not divisible by the DiT patch size 4"):
    build(tiny_config("dit", dit={"patch": 4}), (30, 32, 4), 4)
  with pytest.raises(ValueError, match=r"level patch size 1 must be a multiple of the DiT patch"):
    build(tiny_config("dit", dit={"patch": 2}), (8, 8, 3), 1)
  with pytest.raises(ValueError, match=r"not divisible by the level patch size 3"):
    build(tiny_config("unet"), (8, 8, 3), 3)
  with pytest.raises(ValueError, match=r"size 6, not divisible by the U-Net's total downsampl"):
    build(tiny_config("unet", unet={"channel_mult": (1, 1, 2)}), (6, 8, 3), 1)
  with pytest.raises(ValueError, match=r"not divisible by norm_groups 32"):
    build(tiny_config("unet", unet={"norm_groups": 32}), (8, 8, 3), 1)
  with pytest.raises(ValueError, match=r"unknown model.parametrization 'score'"):
    build(tiny_config("unet", parametrization="score"), (8, 8, 3), 1)
  with pytest.raises(ValueError, match=r"unknown model.dit.size 'M'"):
    build(tiny_config("dit", dit={"size": "M"}), (8, 8, 3), 2)
  with pytest.raises(ValueError, match=r"unknown model dtype 'float16'"):
    build(tiny_config("dit", dtype="float16"), (8, 8, 3), 2)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_bad_call_inputs_raise_clear_errors(name):
  data_shape, p = (8, 8, 3), 2
  model = build(tiny_config(name), data_shape, p, randomize=False)
  z, t, labels = inputs(data_shape, p)
  with pytest.raises(ValueError, match=r"level map t has shape \(2, 8, 8\).*\(2, 4, 4\)"):
    model(z, jnp.zeros((2, 8, 8)), labels)
  with pytest.raises(ValueError, match=r"level map t has shape \(2, 4\)"):
    model(z, jnp.zeros((2, 4)), labels)
  with pytest.raises(ValueError, match=r"built for inputs \[B, 8, 8, 3\] but z has shape"):
    model(jnp.zeros((2, 8, 8, 4)), t, labels)
  with pytest.raises(ValueError, match=r"labels must be integers of shape \[B\]"):
    model(z, t, jnp.zeros((2, 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# The denoiser adapter, CFG and label dropout.


def test_denoiser_matches_model_and_cfg_formula():
  data_shape, p = (8, 8, 3), 2
  model = build(tiny_config("dit", uncertainty=True, parametrization="v"), data_shape, p)
  z, t, labels = inputs(data_shape, p)
  kw = dict(schedule=SCHEDULE, parametrization="v", patch_size=p, num_classes=NUM_CLASSES)

  def manual(y):
    out = apply(model, z, t, y)
    return to_prediction(out.output, z, t, schedule=SCHEDULE, parametrization="v",
                         patch_size=p, log_variance=out.log_variance)

  cond, uncond = manual(labels), manual(jnp.full_like(labels, NUM_CLASSES))
  pred = jax.jit(models.make_denoiser(model, labels=labels, cfg_scale=0.0, **kw))(z, t)
  assert isinstance(pred, Prediction)
  assert pred.x0.shape == z.shape and pred.variance.shape == z.shape
  assert_close(pred.x0, cond.x0)
  assert_close(pred.variance, cond.variance)
  # A traced scale runs both branches in one batched call; at 0 it is the conditional one.
  guide = jax.jit(lambda scale: models.make_denoiser(model, labels=labels, cfg_scale=scale,
                                                     **kw)(z, t))
  assert_close(guide(jnp.float32(0.0)).x0, cond.x0)
  guided = guide(jnp.float32(2.5))
  assert_close(guided.x0, cond.x0 + 2.5 * (cond.x0 - uncond.x0))
  assert_close(guided.variance, cond.variance)
  assert float(jnp.abs(guided.x0 - cond.x0).max()) > 1e-3
  unconditional = jax.jit(models.make_denoiser(model, **kw))(z, t)
  assert_close(unconditional.x0, uncond.x0)


def test_denoiser_in_jit_scan_and_from_split_model():
  data_shape, p = (8, 8, 3), 2
  model = build(tiny_config("dit", level_slots=4), data_shape, p)  # the path switch in a scan
  z, _, labels = inputs(data_shape, p)
  kw = dict(schedule=SCHEDULE, parametrization="eps", patch_size=p, num_classes=NUM_CLASSES,
            labels=labels, cfg_scale=1.5)
  levels = jnp.linspace(1.0, 0.2, 3)

  def sample(denoiser, z):
    def step(z, level):
      t = jnp.full((2, 4, 4), level)
      x0 = denoiser(z, t).x0
      return 0.5 * z + 0.5 * x0, x0.mean()
    return jax.lax.scan(step, z, levels)

  # Reference: a Python loop over a jitted denoiser.
  denoise = jax.jit(models.make_denoiser(model, **kw))
  state_z, means = z, []
  for level in levels:
    x0 = denoise(state_z, jnp.full((2, 4, 4), level)).x0
    state_z, means = 0.5 * state_z + 0.5 * x0, [*means, x0.mean()]
  eager = (state_z, jnp.stack(means))
  closed = jax.jit(lambda z: sample(models.make_denoiser(model, **kw), z))(z)
  graphdef, state = nnx.split(model)
  split = jax.jit(lambda state, z: sample(models.make_denoiser((graphdef, state), **kw), z))(
      state, z)
  for got in (closed, split):
    assert_close(got[0], eager[0])
    assert_close(got[1], eager[1])


def test_denoiser_rejects_mismatches():
  model = build(tiny_config("dit"), (8, 8, 3), 2, randomize=False)
  with pytest.raises(ValueError, match=r"parametrization 'x0' but the model outputs 'eps'"):
    models.make_denoiser(model, schedule=SCHEDULE, parametrization="x0", patch_size=2,
                         num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match=r"num_classes=0 but the model has 5 classes"):
    models.make_denoiser(model, schedule=SCHEDULE, parametrization="eps", patch_size=2)


def test_drop_labels_rate():
  labels = jnp.arange(200_000) % 7
  dropped = models.drop_labels(jax.random.key(0), labels, 0.1, 7)
  is_null = dropped == 7
  assert abs(float(is_null.mean()) - 0.1) < 0.004
  np.testing.assert_array_equal(jnp.where(is_null, labels, dropped), labels)
  np.testing.assert_array_equal(models.drop_labels(jax.random.key(0), labels, 0.0, 7), labels)
  np.testing.assert_array_equal(models.drop_labels(jax.random.key(0), labels, 0.5, 0), labels)
  assert bool(jnp.all(models.drop_labels(jax.random.key(0), labels, 1.0, 7) == 7))
  with pytest.raises(ValueError, match="must lie in"):
    models.drop_labels(jax.random.key(0), labels, 1.5, 7)


def test_sinusoidal_embedding_values():
  emb = models.sinusoidal_embedding(jnp.array([0.0, 1.0]), 8)
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-np.log(10_000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(freqs), np.sin(freqs)]), rtol=1e-6)


def test_level_features():
  """'t': 1000 t (DiT's timestep scale); 'log_snr': λ mapped from [20, −20] onto [0, 1000], the
  same for any schedule, so a λ-conditioned network can be sampled under another schedule."""
  from asyncpatch_jax.models.embeddings import level_feature

  t = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(level_feature(t, "t", None), 1000 * t, rtol=1e-6)
  for schedule in (SCHEDULE, get_schedule("linear")):
    feature = level_feature(t, "log_snr", schedule)
    np.testing.assert_allclose(feature, 25.0 * (20.0 - schedule.log_snr(t)), rtol=1e-5)
    assert bool(jnp.all(jnp.diff(feature) > 0))
  with pytest.raises(ValueError, match="needs the noise schedule"):
    level_feature(t, "log_snr", None)
