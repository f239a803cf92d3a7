"""`configs/imagenet.py:debug` end to end on CPU: mocked TFDS imagenet2012 → a tiny random VAE
saved where the config points → latent caches → 4 training steps → checkpoint → samples decoded
to a PNG grid. And the ways an unprepared or mismatched latent run is refused before compiling."""

import pathlib
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import data as data_lib  # noqa: E402
from asyncpatch_jax.autoencoder import VAEConfig, init_vae, save_vae  # noqa: E402
from asyncpatch_jax.data import latent_cache  # noqa: E402
from asyncpatch_jax.latents.encode import build_latent_cache, make_source  # noqa: E402
from asyncpatch_jax.train import restore as restore_lib  # noqa: E402
from asyncpatch_jax.train import samples as samples_lib  # noqa: E402
from asyncpatch_jax.train import trainer, validation  # noqa: E402
from configs import imagenet  # noqa: E402

NUM_EXAMPLES = 16


def _build_caches(vae, weights, latent_dir, image_size, splits=("train", "validation")):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    for split in splits:
      source, name = make_source("tfds", image_size=image_size, tfds_name="imagenet2012",
                                 split=split)
      build_latent_cache(source, vae, latent_dir / split, image_size=image_size, batch_size=8,
                         shard_size=8, source_name=name, weights_file=str(weights), log=None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A debug config whose VAE file and latent caches exist (a tiny VAE, seed 1)."""
  root = tmp_path_factory.mktemp("imagenet_debug")
  import tempfile
  tempfile.tempdir, saved = str(root), tempfile.tempdir  # TFDS's temporary DatasetInfo dirs
  try:
    config = imagenet.get_config("debug")
    config.vae.weights = str(root / "vae" / "diffusion_pytorch_model.safetensors")
    config.data.latent_dir = str(root / "latents")
    (root / "vae").mkdir()
    vae = init_vae(VAEConfig.tiny(), seed=1)
    save_vae(vae, config.vae.weights)
    _build_caches(vae, config.vae.weights, root / "latents", config.data.image_size)
  finally:
    tempfile.tempdir = saved
  return config, root


def test_debug_config_trains_checkpoints_and_decodes_samples(prepared):
  config, root = prepared
  assert config.data.source == "latents" and config.model.name == "dit"
  assert config.model.num_classes == 1000 and config.sampling.cfg_scale == 1.5
  config = config.copy_and_resolve_references()
  config.eval.every_steps, config.eval.num_batches = 4, 1  # held-out loss on the eval latents
  validation.validate_config(config)
  workdir = root / "run"
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == config.num_steps == 4
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  size = config.data.image_size  # 32² pixels from 4×4×4 latents
  with Image.open(workdir / "samples_latest.png") as grid:
    assert grid.mode == "RGB" and grid.size[0] >= 2 * size

  # The checkpoint, restored in a fresh set-up, samples latents and decodes them to pixels.
  _, _, setup, restored, step = restore_lib.restore_latest(config, workdir)
  assert step == 4
  out_dir = root / "sampled"
  out_dir.mkdir()
  arrays = samples_lib.SampleWriter(config, setup, out_dir)(restored, step)
  n, k = config.sampling.num_samples, config.sampling.num_inpaint
  assert arrays["samples"].shape == (n, size, size, 3)
  assert arrays["inpaint"].shape == (3 * k, size, size, 3)
  for images in arrays.values():
    assert np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0.01  # decoded pictures, not a constant
  with Image.open(out_dir / "samples_00000004.png") as grid:
    assert grid.mode == "RGB" and grid.size[0] >= 2 * size
  # The inpainting grid's "original" row is the VAE's reconstruction of the eval latents.
  reference, _ = data_lib.reference_images(config.data, k)
  assert reference.shape == (k, 4, 4, 4) and reference.dtype == np.float32
  decoded = samples_lib.make_decoder(config)(reference)
  np.testing.assert_allclose(arrays["inpaint"][2 * k:], decoded, atol=1e-5)


def _no_jit(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("compiled before the input was checked")
  monkeypatch.setattr(jax, "jit", refuse)


def test_missing_cache_names_the_build_commands(prepared, tmp_path, monkeypatch):
  config, _ = prepared
  config = config.copy_and_resolve_references()
  config.data.latent_dir = str(tmp_path / "latents")
  _no_jit(monkeypatch)
  with pytest.raises(validation.ConfigError) as error:
    trainer.train_and_evaluate(config, tmp_path / "run")
  message = str(error.value)
  for split in ("train", "validation"):
    assert (f"--split={split} --label_key=label --tfds_data_dir=DATA_DIR --image_size=32 "
            f"--vae_config=tiny --vae_weights={config.vae.weights} "
            f"--out={tmp_path}/latents/{split}") in message
  assert ("DATA_DIR/downloads/manual, then `tfds build imagenet2012 --data_dir=DATA_DIR "
          "--file_format=array_record`") in message
  assert not (tmp_path / "run").exists()


def test_real_config_without_weights_or_cache_says_how_to_prepare(monkeypatch, tmp_path):
  config = imagenet.get_config()  # DiT-XL/2: nothing prepared on this machine
  config.vae.weights = str(tmp_path / "missing.safetensors")
  _no_jit(monkeypatch)
  with pytest.raises(validation.ConfigError) as error:
    trainer.train_and_evaluate(config, tmp_path / "run")
  message = str(error.value)
  assert f"the VAE weights file {str(tmp_path / 'missing.safetensors')!r}" in message
  assert ("https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/"
          "diffusion_pytorch_model.safetensors") in message
  assert "config.data.latent_dir is not set" in message
  assert "--image_size=256 --vae_config=sd" in message and "--out=LATENT_DIR/train" in message
  assert not (tmp_path / "run").exists()


def test_missing_weights_file_with_a_complete_cache(prepared, tmp_path):
  config, _ = prepared
  config = config.copy_and_resolve_references()
  config.vae.weights = str(tmp_path / "elsewhere.safetensors")
  with pytest.raises(validation.ConfigError, match=r"(?s)elsewhere\.safetensors.*"
                     r"huggingface-cli download stabilityai/sd-vae-ft-ema") as error:
    validation.validate_config(config)
  assert "latent cache" not in str(error.value)  # only what is missing


def test_cache_of_a_different_vae_is_refused(prepared, tmp_path):
  config, _ = prepared
  config = config.copy_and_resolve_references()
  config.vae.weights = str(tmp_path / "other.safetensors")
  save_vae(init_vae(VAEConfig.tiny(), seed=2), config.vae.weights)
  validation.validate_config(config)  # every file is there ...
  with pytest.raises(latent_cache.LatentCacheMismatchError,
                     match=r"different VAE \(diffusion_pytorch_model\.safetensors"):
    samples_lib.make_decoder(config)  # ... but its latents are not this VAE's


def test_cache_of_a_different_resolution_is_refused(prepared):
  config, _ = prepared
  config = config.copy_and_resolve_references()
  config.data.image_size = 64  # the caches hold 32² images
  with pytest.raises(latent_cache.LatentCacheMismatchError, match="resolution: cache 32, run 64"):
    data_lib.get_source(config.data, "train")


def test_eval_mode_fid_decodes_latents_against_the_encoded_images(prepared, monkeypatch):
  """--mode=eval on a latent run: decoded samples against the TFDS images the cache encoded."""
  import tempfile

  import jax.numpy as jnp
  from flax import nnx

  from asyncpatch_jax import evaluation
  from asyncpatch_jax.train import eval_job

  config, root = prepared
  config = config.copy_and_resolve_references()
  workdir = root / "run"
  if not (workdir / "checkpoints").exists():  # run alone: train the 4 steps first
    trainer.train_and_evaluate(config, workdir)
  seen = []

  class Features(nnx.Module):  # a stand-in for Inception: records its inputs' shapes
    def __init__(self):
      self.dense = nnx.Linear(3, 8, rngs=nnx.Rngs(0))

    def __call__(self, x):
      seen.append(x.shape)
      return jnp.tanh(self.dense(x[:, ::20, ::20].mean((1, 2))))

  class Extractor(evaluation.FeatureExtractor):
    def __init__(self, mesh=None, **kwargs):
      super().__init__(model=Features(), mesh=mesh, **kwargs)

  monkeypatch.setattr(evaluation, "FeatureExtractor", Extractor)
  monkeypatch.setattr(tempfile, "tempdir", str(root))
  config.eval.fid_samples, config.eval.fid_batch_size = 6, 4
  config.eval.fid_split = "validation"
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    results = eval_job.evaluate(config, workdir)
  assert results["eval/num_samples"] == 6 and np.isfinite(results["eval/fid"])
  assert all(shape[1:] == (299, 299, 3) for shape in seen)
  cached = list((workdir / "fid_cache").iterdir())
  assert len(cached) == 1 and "validation-32" in cached[0].name
  with np.load(cached[0]) as reference:
    assert int(reference["count"]) == NUM_EXAMPLES  # every image of the split
