"""`data.source='synthetic'`: deterministic random records of a config's shape (pixels or VAE
latents, labels included) that resume exactly, so any config's `:debug` trains without its data
set, VAE weights or latent cache."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import data as data_lib  # noqa: E402
from asyncpatch_jax.data import sources  # noqa: E402
from asyncpatch_jax.train import builders, trainer, validation  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from configs import cifar10, imagenet, lsun  # noqa: E402


def _synthetic(config):
  config.data.source = "synthetic"
  return config


def test_records_are_a_function_of_seed_split_and_index():
  config = _synthetic(cifar10.get_config("debug"))
  a, b = data_lib.get_source(config.data, "train"), data_lib.get_source(config.data, "train")
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
  assert a[5]["label"] == b[5]["label"]
  assert not np.array_equal(a[5]["image"], a[6]["image"])
  test = data_lib.get_source(config.data, "test")
  assert not np.array_equal(a[5]["image"], test[5]["image"])  # splits differ
  config.data.seed = 1
  assert not np.array_equal(a[5]["image"], data_lib.get_source(config.data, "train")[5]["image"])


def test_pixel_and_latent_shapes_and_labels():
  pixels = _synthetic(cifar10.get_config("debug"))
  validation.validate_config(pixels)
  record = data_lib.get_source(pixels.data, "train")[0]
  assert record["image"].dtype == np.uint8 and record["image"].shape == (16, 16, 3)
  assert builders.data_shape(pixels) == (16, 16, 3)

  latents = _synthetic(imagenet.get_config("debug"))  # a tiny VAE: 32² pixels → 4×4×4
  validation.validate_config(latents)  # no VAE file, no latent cache needed
  source = data_lib.get_source(latents.data, "train")
  assert data_lib.latent_data(latents.data) and source.latents
  image = source[0]["image"]
  assert image.dtype == np.float32 and image.shape == (4, 4, 4) == builders.data_shape(latents)
  labels = np.array([source[i]["label"] for i in range(2000)])
  assert labels.min() >= 0 and labels.max() < 1000 and len(np.unique(labels)) > 500
  assert abs(np.stack([source[i]["image"] for i in range(64)]).std() - 1.0) < 0.1

  church = _synthetic(lsun.get_config("debug"))  # unconditional latents
  validation.validate_config(church)
  source = data_lib.get_source(church.data, "validation")
  assert source.latents and {source[i]["label"] for i in range(32)} == {0}

  sd = _synthetic(imagenet.get_config())  # the real DiT-XL/2 config: SD latents of 256² images
  assert builders.data_shape(sd) == (32, 32, 4)
  pixel64 = _synthetic(imagenet.get_config("pixel64"))
  assert not data_lib.latent_data(pixel64.data) and builders.data_shape(pixel64) == (64, 64, 3)


def test_pipeline_batches_resume_exactly():
  config = _synthetic(imagenet.get_config("debug"))
  sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(config.mesh))
  pipeline = data_lib.create_train_pipeline(config.data, sharding)
  first = next(pipeline)
  assert first["image"].shape == (8, 4, 4, 4) and first["image"].dtype == np.float32
  assert first["label"].shape == (8,) and first["label"].dtype == np.int32
  state = pipeline.iterator.get_state()
  expected = next(pipeline)
  pipeline.close()
  resumed = data_lib.create_train_pipeline(config.data, sharding)
  resumed.iterator.set_state(state)
  got = next(resumed)
  resumed.close()
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
  assert not np.array_equal(np.asarray(first["image"]), np.asarray(expected["image"]))


def test_synthetic_latents_refuse_fid():
  config = _synthetic(imagenet.get_config("debug"))
  config.eval.fid_samples = 16
  with pytest.raises(validation.ConfigError, match="fid_samples"):
    validation.validate_config(config)


@pytest.mark.parametrize("module", [imagenet, lsun], ids=["imagenet", "lsun"])
def test_debug_config_trains_without_data(module, tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "SYNTHETIC_BATCHES", 2)
  config = _synthetic(module.get_config("debug"))
  config.num_steps = 2
  config.sampling.num_inpaint = 1
  state = trainer.train_and_evaluate(config, tmp_path)
  assert int(state.step) == 2
  assert (tmp_path / "checkpoints" / "2").is_dir()
  with Image.open(tmp_path / "samples_latest.png") as grid:  # decoded by the tiny random VAE
    assert grid.mode == "RGB" and grid.size[0] >= 32
  assert jax.tree.all(jax.tree.map(lambda x: bool(np.isfinite(np.asarray(x)).all()),
                                   state.params))
