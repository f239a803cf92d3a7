"""Fuzzing the public API beyond the diffusion core (hypothesis): the sampler, masks, level
samplers, the network + denoiser and the evaluation helpers. Bad shapes, dtypes and ranges must
raise a clean ValueError / TypeError; whatever is accepted must come out finite and well-shaped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpatch_jax import diffusion
from asyncpatch_jax.diffusion import level_samplers
from asyncpatch_jax.sampling import masks, sampler

CLEAN_ERRORS = (ValueError, TypeError)
FEW = settings(max_examples=12, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SCHEDULE = diffusion.get_schedule("cosine")
small = st.integers(-1, 4)
odd_numbers = st.one_of(st.integers(-2, 4), st.floats(allow_nan=True, allow_infinity=True),
                        st.none(), st.just("3"), st.booleans())


def _zero_denoiser(z, t):
  del t
  return jnp.zeros_like(z)


@FEW
@given(batch=st.integers(0, 2), spatial=st.lists(st.integers(0, 4), max_size=3),
       channels=st.integers(0, 2), patch=st.one_of(st.integers(0, 3), st.just((1, 2))),
       num_steps=odd_numbers,
       strategy=st.sampled_from(["uniform", "adaptive", "autoregressive", "repaint", "zigzag"]),
       mask_shape=st.one_of(st.none(), st.lists(st.integers(1, 4), max_size=4)),
       known_dtype=st.sampled_from([np.float32, np.int32, np.bool_]))
def test_sample_rejects_bad_input_cleanly(batch, spatial, channels, patch, num_steps, strategy,
                                          mask_shape, known_dtype):
  x_shape = (batch, *spatial, channels)
  kwargs = {}
  if mask_shape is not None:
    kwargs = {"known": np.ones(x_shape if all(x_shape) else (1, 1), known_dtype),
              "known_mask": np.ones(mask_shape, bool)}
  try:
    out, info = sampler.sample(_zero_denoiser, jax.random.key(0), x_shape, schedule=SCHEDULE,
                               strategy=strategy, num_steps=num_steps, patch_size=patch,
                               **kwargs)
  except CLEAN_ERRORS:
    return
  out = np.asarray(out)
  assert out.shape == x_shape and out.dtype == np.float32
  assert np.isfinite(out).all()
  assert int(info["nfe"]) >= 0


def test_sample_accepts_the_documented_inputs():
  """The fuzz above must not pass only because everything raises."""
  out, info = sampler.sample(_zero_denoiser, jax.random.key(0), (2, 4, 4, 1), schedule=SCHEDULE,
                             num_steps=3, patch_size=2, known=np.zeros((1, 4, 4, 1)),
                             known_mask=np.array([[True, False], [False, False]]))
  assert out.shape == (2, 4, 4, 1) and np.isfinite(np.asarray(out)).all()
  assert int(info["nfe"]) == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sample_rejects_non_finite_known_context(bad):
  known = np.zeros((1, 4, 4, 1), np.float32)
  known[0, 0, 0, 0] = bad
  mask = np.zeros((1, 4, 4), bool)
  mask[0, 0, 0] = True
  with pytest.raises(ValueError, match="known"):
    sampler.sample(_zero_denoiser, jax.random.key(0), (1, 4, 4, 1), schedule=SCHEDULE,
                   num_steps=2, known=known, known_mask=mask)


@pytest.mark.parametrize("denoiser,message", [
    (lambda z, t: jnp.zeros(z.shape[:-1]), "x0 of shape"),
    (lambda z, t: "x0", "must return an array"),
], ids=["wrong_shape", "not_an_array"])
def test_sample_rejects_a_bad_denoiser(denoiser, message):
  with pytest.raises(CLEAN_ERRORS, match=message):
    sampler.sample(denoiser, jax.random.key(0), (1, 4, 4, 1), schedule=SCHEDULE, num_steps=2)


@MANY
@given(name=st.sampled_from([*sorted(masks.MASKS), "", "Half", "stroke"]), batch=small,
       grid=st.lists(small, max_size=4), seed=st.one_of(st.none(), st.integers(0, 5)))
def test_make_mask_shapes_or_clean_errors(name, batch, grid, seed):
  try:
    mask = masks.make_mask(name, batch, grid, seed=seed)
  except CLEAN_ERRORS:
    return
  assert mask.dtype == np.bool_ and mask.shape == (batch, *grid)


@MANY
@given(name=st.sampled_from([*sorted(level_samplers.SAMPLERS), "mixture", "bogus"]),
       field=st.sampled_from(["t_min", "t_max", "p_hom", "kappa", "max_overlap", "logit_scale",
                              "known_fraction", "order", "kinds", "mean_distribution",
                              "unknown_field"]),
       value=st.one_of(odd_numbers, st.tuples(st.floats(-1, 2), st.floats(-1, 2)),
                       st.sampled_from(["random", "half,box", "spiral", "logit_normal"])),
       batch=st.integers(1, 3), grid=st.lists(st.integers(1, 4), min_size=1, max_size=2))
def test_level_samplers_in_range_or_clean_errors(name, field, value, batch, grid):
  config = ({"name": "mixture", "components": {"a": {"name": "iid", field: value}}}
            if name == "mixture" else {"name": name, field: value})
  try:
    sample = level_samplers.from_config(config)
    t = np.asarray(sample(jax.random.key(1), (batch, *grid)))
  except CLEAN_ERRORS:
    return
  assert t.shape == (batch, *grid)
  assert np.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


def _tiny_model(name, data_shape, level_patch, num_classes=0):
  from flax import nnx

  from asyncpatch_jax import models

  config = models.default_config()
  config.update({"name": name, "num_classes": num_classes, "level_slots": 0,
                 "unet": {"channels": 8, "channel_mult": (1,), "num_res_blocks": 1,
                          "attention_resolutions": (), "norm_groups": 4, "num_heads": 2,
                          "dropout": 0.0},
                 "dit": {"hidden_size": 16, "depth": 1, "num_heads": 2, "patch": 1}})
  return models.get_model(config, data_shape=data_shape, level_patch_size=level_patch,
                          schedule=SCHEDULE, rngs=nnx.Rngs(0))


@FEW
@given(name=st.sampled_from(["unet", "dit"]),
       z_shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       t_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       t_value=st.sampled_from([0.5, 1.5, -0.1, np.nan]),
       labels=st.sampled_from([None, "ints", "floats", "wrong_batch"]))
def test_denoiser_rejects_bad_calls_cleanly(name, z_shape, t_shape, t_value, labels):
  from asyncpatch_jax import models

  model = _MODELS[name]
  denoise = models.make_denoiser(model, schedule=SCHEDULE, parametrization="eps", patch_size=2,
                                 labels=_labels(labels, z_shape[0]), num_classes=3)
  z = jnp.ones(z_shape, jnp.float32)
  t = jnp.full(t_shape, t_value, jnp.float32)
  try:
    pred = diffusion.as_prediction(denoise(z, t))
  except CLEAN_ERRORS:
    return
  assert pred.x0.shape == z.shape
  assert 0 <= t_value <= 1, "a level outside [0, 1] (or NaN) was accepted"
  assert np.isfinite(np.asarray(pred.x0)).all()


def _labels(kind, batch):
  return {None: None, "ints": jnp.zeros((batch,), jnp.int32),
          "floats": jnp.zeros((batch,), jnp.float32),
          "wrong_batch": jnp.zeros((batch + 1,), jnp.int32)}[kind]


_MODELS = {}


@pytest.fixture(scope="module", autouse=True)
def _models():
  _MODELS["unet"] = _tiny_model("unet", (4, 4, 1), 2, num_classes=3)
  _MODELS["dit"] = _tiny_model("dit", (4, 4, 1), 2, num_classes=3)
  yield
  _MODELS.clear()


def test_denoiser_accepts_the_documented_call():
  from asyncpatch_jax import models

  for model in _MODELS.values():
    denoise = models.make_denoiser(model, schedule=SCHEDULE, parametrization="eps", patch_size=2,
                                   labels=jnp.array([0, 2]), num_classes=3)
    pred = diffusion.as_prediction(denoise(jnp.ones((2, 4, 4, 1)), jnp.full((2, 2, 2), 0.3)))
    assert pred.x0.shape == (2, 4, 4, 1) and np.isfinite(np.asarray(pred.x0)).all()


@MANY
@given(shape=st.lists(st.integers(0, 5), max_size=5),
       dtype=st.sampled_from([np.uint8, np.float32, np.int32, np.bool_]),
       fill=st.sampled_from([0.0, 0.5, 1.0, -1.0, 300.0, np.nan]))
def test_evaluation_image_checks(shape, dtype, fill):
  from asyncpatch_jax.evaluation import images

  with np.errstate(invalid="ignore"):
    x = np.full(shape, fill).astype(dtype)
  try:
    pixels = np.asarray(images.to_pixels(x))
  except CLEAN_ERRORS:
    return
  assert pixels.dtype == np.uint8 and pixels.shape == x.shape


@MANY
@given(n1=st.integers(0, 6), n2=st.integers(0, 6), dim=st.integers(0, 4),
       poison=st.sampled_from([None, np.nan, np.inf]))
def test_frechet_distance_finite_or_clean_error(n1, n2, dim, poison):
  from asyncpatch_jax.evaluation import fid

  rng = np.random.default_rng(n1 * 7 + n2)
  f1, f2 = rng.normal(size=(n1, dim)), rng.normal(size=(n2, dim)) + 0.5
  if poison is not None and f1.size:
    f1[0, 0] = poison
  try:
    value = fid.frechet_distance(fid.feature_statistics(f1), fid.feature_statistics(f2))
  except CLEAN_ERRORS:
    return
  assert np.isfinite(value) and value >= -1e-6
