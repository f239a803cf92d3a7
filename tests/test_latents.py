"""Tests of the latent cache (build sharded over 8 CPU devices, read back equal to a direct
encoding, resume after an interruption = an uninterrupted build, metadata checks, the training
example transform) and of the LSUN LMDB reader on an LMDB the test writes."""

import io
import os
import pickle

import grain
import jax
import lmdb
import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax.autoencoder import VAEConfig, init_vae, params_fingerprint
from asyncpatch_jax.data import latent_cache
from asyncpatch_jax.data.preprocess import center_crop_resize
from asyncpatch_jax.data.sources import DatasetNotFoundError
from asyncpatch_jax.latents import encode, lsun
from asyncpatch_jax.latents.encode import make_source

IMAGE_SIZE = 16
NUM_EXAMPLES = 10
SHARD_SIZE = 4    # shards of 4, 4 and 2 examples
BATCH_SIZE = 8    # one row per fake CPU device; each shard is one padded global batch


class Images:
  """An in-memory source of non-square uint8 images (so the ADM crop matters) and labels."""

  def __init__(self, n=NUM_EXAMPLES, fail_at=None):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, 20, 28, 3), dtype=np.uint8)
    self.labels = np.arange(n) % 3
    self.fail_at = fail_at
    self.read = set()

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    if self.fail_at is not None and i >= self.fail_at:
      raise RuntimeError(f"simulated interruption at record {i}")
    self.read.add(int(i))
    return {"image": self.images[i], "label": int(self.labels[i])}


@pytest.fixture(scope="module")
def vae():
  return init_vae(VAEConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, vae):
  """An uninterrupted build on the 8-device mesh."""
  cache_dir = tmp_path_factory.mktemp("cache") / "train"
  metadata = encode.build_latent_cache(
      Images(), vae, cache_dir, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE,
      shard_size=SHARD_SIZE, source_name="test:images", log=None)
  return cache_dir, metadata


def _records(cache_dir):
  from array_record.python.array_record_module import ArrayRecordReader
  out = []
  for name in sorted(os.listdir(cache_dir)):
    if name.endswith(".array_record"):
      reader = ArrayRecordReader(str(cache_dir / name))
      out.append(reader.read_all())
      reader.close()
  return out


def test_cache_holds_the_direct_encoding(built, vae):
  cache_dir, metadata = built
  assert len(jax.devices()) == 8
  assert metadata["complete"] and metadata["num_shards"] == 3
  assert metadata["latent_shape"] == [2, 2, 4] and metadata["image_size"] == IMAGE_SIZE
  assert metadata["scaling_factor"] == vae.config.scaling_factor
  assert metadata["vae"]["fingerprint"] == params_fingerprint(vae)
  assert sorted(os.listdir(cache_dir)) == [
      "latents-00000-of-00003.array_record", "latents-00001-of-00003.array_record",
      "latents-00002-of-00003.array_record", "metadata.json"]
  source = latent_cache.LatentCacheSource(cache_dir, vae=vae, image_size=IMAGE_SIZE)
  assert len(source) == NUM_EXAMPLES
  images = Images()
  crops = np.stack([center_crop_resize(im, IMAGE_SIZE) for im in images.images])
  x = crops.astype(np.float32) / 127.5 - 1.0
  direct = jax.jit(lambda x: vae.encode(x))(np.concatenate([x, x[:, :, ::-1]]))
  for i in range(NUM_EXAMPLES):
    record = source[i]
    assert record["label"] == images.labels[i]
    assert record["mean"].shape == record["logvar"].shape == (2, 2, 2, 4)
    for view in range(2):
      j = i + view * NUM_EXAMPLES
      np.testing.assert_allclose(record["mean"][view], direct.mean[j], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(record["logvar"][view], direct.logvar[j], rtol=1e-5, atol=1e-5)
  batch = source.__getitems__([3, 9])
  np.testing.assert_array_equal(batch[1]["mean"], source[9]["mean"])
  # Picklable for grain's worker processes, and usable as a grain source.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[7]["logvar"], source[7]["logvar"])
  preprocess = latent_cache.LatentPreprocess(source.scaling_factor)
  ds = grain.MapDataset.source(source).map(preprocess).batch(5)
  first = ds[0]
  assert first["image"].shape == (5, 2, 2, 4) and first["image"].dtype == np.float32
  np.testing.assert_array_equal(first["label"], images.labels[:5])


def test_sharded_build_equals_single_device(built, vae, tmp_path):
  cache_dir, _ = built
  encode.build_latent_cache(
      Images(), vae, tmp_path, image_size=IMAGE_SIZE, batch_size=3, shard_size=SHARD_SIZE,
      mesh=encode.data_mesh(jax.devices()[:1]), source_name="test:images", log=None)
  sharded = latent_cache.LatentCacheSource(cache_dir)
  single = latent_cache.LatentCacheSource(tmp_path)
  for i in range(NUM_EXAMPLES):
    np.testing.assert_allclose(sharded[i]["mean"], single[i]["mean"], rtol=1e-5, atol=1e-6)
    assert sharded[i]["label"] == single[i]["label"]


def test_resume_after_interruption_equals_uninterrupted(built, vae, tmp_path):
  cache_dir, _ = built
  kwargs = dict(image_size=IMAGE_SIZE, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE,
                source_name="test:images")
  with pytest.raises(RuntimeError, match="simulated interruption"):
    encode.build_latent_cache(Images(fail_at=6), vae, tmp_path, log=None, **kwargs)
  names = sorted(os.listdir(tmp_path))
  assert names == ["latents-00000-of-00003.array_record", "metadata.json"]  # no partial shard
  assert not latent_cache.read_metadata(tmp_path)["complete"]
  with pytest.raises(latent_cache.LatentCacheNotFoundError, match=r"incomplete \(1 of 3 shards"):
    latent_cache.LatentCacheSource(tmp_path)
  messages = []
  resumed = Images()
  metadata = encode.build_latent_cache(resumed, vae, tmp_path, log=messages.append, **kwargs)
  assert metadata["complete"]
  assert min(resumed.read) == SHARD_SIZE  # the complete shard was not encoded again
  assert "1 of 3 shards already complete" in messages[0]
  assert _records(tmp_path) == _records(cache_dir)  # byte-identical to the uninterrupted build
  # Running it again is a no-op.
  again = Images(fail_at=0)
  encode.build_latent_cache(again, vae, tmp_path, log=None, **kwargs)


def test_metadata_mismatches_are_refused(built, vae, tmp_path):
  cache_dir, _ = built
  other = init_vae(VAEConfig.tiny(), seed=1)
  with pytest.raises(latent_cache.LatentCacheMismatchError, match="different VAE"):
    latent_cache.LatentCacheSource(cache_dir, vae=other)
  with pytest.raises(latent_cache.LatentCacheMismatchError, match="different VAE"):
    latent_cache.LatentCacheSource(cache_dir, vae=params_fingerprint(other))
  with pytest.raises(latent_cache.LatentCacheMismatchError, match="resolution: cache 16, run 32"):
    latent_cache.LatentCacheSource(cache_dir, vae=vae, image_size=32)
  with pytest.raises(latent_cache.LatentCacheMismatchError, match="scaling factor"):
    latent_cache.LatentCacheSource(cache_dir, scaling_factor=0.13025)
  with pytest.raises(latent_cache.LatentCacheNotFoundError, match=r"latents\.build"):
    latent_cache.LatentCacheSource(tmp_path / "nothing")
  # Resuming into a directory written with other settings would mix two caches.
  with pytest.raises(latent_cache.LatentCacheMismatchError, match="image_size"):
    encode.build_latent_cache(Images(), vae, cache_dir, image_size=8, batch_size=BATCH_SIZE,
                                 shard_size=SHARD_SIZE, source_name="test:images", log=None)
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    encode.build_latent_cache(Images(), vae, tmp_path, image_size=IMAGE_SIZE, batch_size=6)


def test_float16_storage(built, vae, tmp_path):
  cache_dir, _ = built
  encode.build_latent_cache(Images(4), vae, tmp_path, image_size=IMAGE_SIZE,
                               batch_size=BATCH_SIZE, shard_size=SHARD_SIZE,
                               storage_dtype="float16", log=None)
  half, full = latent_cache.LatentCacheSource(tmp_path), latent_cache.LatentCacheSource(cache_dir)
  assert half.metadata["storage_dtype"] == "float16"
  assert half[2]["mean"].dtype == np.float32
  np.testing.assert_allclose(half[2]["mean"], full[2]["mean"], rtol=1e-3, atol=1e-3)


def test_latent_preprocess():
  rng = np.random.default_rng(0)
  record = {"mean": rng.standard_normal((2, 2, 2, 4)).astype(np.float32),
            "logvar": np.full((2, 2, 2, 4), np.log(0.25), np.float32), "label": 2}
  pre = latent_cache.LatentPreprocess(0.5)
  evaluation = pre(record)
  np.testing.assert_allclose(evaluation["image"], 0.5 * record["mean"][0])
  assert evaluation["label"] == 2
  a, b = pre(record, flip_key=(0, 7)), pre(record, flip_key=(0, 7))
  np.testing.assert_array_equal(a["image"], b["image"])  # a function of the stream position
  views, residuals = [], []
  for g in range(400):
    z = pre(record, flip_key=(0, g))["image"] / 0.5
    view = int(np.abs(z - record["mean"][1]).sum() < np.abs(z - record["mean"][0]).sum())
    views.append(view)
    residuals.append(z - record["mean"][view])
  assert 0.4 < np.mean(views) < 0.6
  assert abs(np.std(residuals) - 0.5) < 0.02  # z ~ N(mean, exp(logvar)) = N(mean, 0.5²)
  fixed = latent_cache.LatentPreprocess(0.5, random_flip=False, sample=False)
  np.testing.assert_allclose(fixed(record, flip_key=(0, 3))["image"], 0.5 * record["mean"][0])


# --------------------------------------------------------------------------------------------
# LSUN.


def _encode(image, fmt):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, quality=90)
  return buf.getvalue()


@pytest.fixture(scope="module")
def lsun_lmdb(tmp_path_factory):
  """An LSUN-style export: webp (and one jpeg) bytes keyed by hex ids; one image is too small."""
  path = tmp_path_factory.mktemp("lsun") / "church_outdoor_train_lmdb"
  rng = np.random.default_rng(0)
  sizes = [(48, 64), (40, 40), (70, 45), (20, 30), (41, 90)]  # (h, w); (20, 30) is too small
  images = {}
  env = lmdb.open(str(path), map_size=2**26)
  with env.begin(write=True) as txn:
    for i, (h, w) in enumerate(sizes):
      key = f"{i:02d}{rng.integers(2**60):016x}".encode()
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      data = _encode(image, "JPEG" if i == 2 else "WEBP")
      txn.put(key, data)
      images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  env.close()
  return path, images


def test_lsun_reader(lsun_lmdb, tmp_path):
  path, images = lsun_lmdb
  keys = sorted(images)
  source = lsun.LsunSource(path, image_size=32)
  assert len(source) == 5 and [source.key(i) for i in range(5)] == keys
  record = source[2]  # the jpeg
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
  np.testing.assert_array_equal(record["image"], center_crop_resize(images[keys[2]], 32))
  with pytest.raises(lsun.ImageTooSmallError, match=r"30×20, smaller than the 32×32 crop"):
    source[3]
  raw = lsun.LsunSource(path, image_size=None)
  np.testing.assert_array_equal(raw[4]["image"], images[keys[4]])
  # Skip-and-count, with the key list cached in a file and reused.
  keys_file = tmp_path / "keys.txt"
  skipping = lsun.LsunSource(path, image_size=32, small_images="skip", keys_file=keys_file)
  assert len(skipping) == 4 and skipping.num_skipped == 1
  assert keys[3] not in [skipping.key(i) for i in range(4)]
  reread = lsun.LsunSource(path, image_size=32, small_images="skip", keys_file=keys_file)
  assert [reread.key(i) for i in range(4)] == [skipping.key(i) for i in range(4)]
  with pytest.raises(ValueError, match="another export or settings"):
    lsun.LsunSource(path, image_size=16, small_images="skip", keys_file=keys_file)
  # Picklable (grain workers reopen the environment).
  clone = pickle.loads(pickle.dumps(skipping))
  np.testing.assert_array_equal(clone[1]["image"], skipping[1]["image"])
  with pytest.raises(DatasetNotFoundError, match=r"download\.py"):
    lsun.LsunSource(tmp_path / "bedroom_train_lmdb")
  built, name = make_source("lsun", image_size=32, lsun_lmdb=str(path),
                            lsun_small_images="skip")
  assert len(built) == 4 and name == "lsun:church_outdoor_train_lmdb"


@pytest.mark.slow
def test_build_cli_end_to_end(lsun_lmdb, tmp_path):
  """The command line on the full-size SD VAE (a generated float16 file with the real key names)
  over the test's LSUN export, interrupted by nothing; ≈30 s on two CPU cores."""
  import subprocess
  import sys

  from asyncpatch_jax.autoencoder import weights

  path, _ = lsun_lmdb
  rng = np.random.default_rng(0)
  tensors = {k: (rng.standard_normal(s, dtype=np.float32) / np.sqrt(np.prod(s[1:]))
                 ).astype(np.float16) if len(s) > 1 else np.zeros(s, np.float16)
             for k, s in weights.expected_tensors().items()}
  weights_file = tmp_path / weights.HF_FILENAME
  weights.write_safetensors(weights_file, weights.to_old_attention_names(tensors))
  out = tmp_path / "cache"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  subprocess.run(
      [sys.executable, "-m", "asyncpatch_jax.latents.build", "--source=lsun",
       f"--lsun_lmdb={path}", "--lsun_small_images=skip", "--image_size=32",
       f"--vae_weights={weights_file}", f"--out={out}", "--batch_size=2", "--shard_size=3",
       "--num_threads=2"], check=True, env=env, timeout=600)
  from asyncpatch_jax.autoencoder import load_vae
  source = latent_cache.LatentCacheSource(out, vae=load_vae(weights_file), image_size=32)
  assert len(source) == 4 and source.metadata["num_shards"] == 2
  assert source.metadata["vae"]["weights_file"] == weights.HF_FILENAME
  assert source[3]["mean"].shape == (2, 4, 4, 4)


def _write_lsun_export(path, num, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  env = lmdb.open(str(path), map_size=2**24)
  rng = np.random.default_rng(seed)
  with env.begin(write=True) as txn:
    for i in range(num):
      image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
      txn.put(f"{i:04d}".encode(), _encode(image, "WEBP"))
  env.close()


def test_lsun_debug_config_runs_the_commands_it_prints(tmp_path):
  """configs/lsun.py:debug with the exports but no caches: the message asks only for the caches,
  and its commands, run as printed, prepare a run that validates and yields latent batches."""
  import shlex
  import sys

  from absl import flags
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from asyncpatch_jax.data import pipeline, preparation
  from asyncpatch_jax.latents import build
  from asyncpatch_jax.train import validation

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import lsun as lsun_config

  for part in ("train", "val"):
    _write_lsun_export(tmp_path / "lsun" / f"church_outdoor_{part}_lmdb", 8, len(part))
  config = lsun_config.get_config("debug")
  config.data.lsun_dir = str(tmp_path / "lsun")
  config.data.latent_dir = str(tmp_path / "latents")
  message = preparation.missing_preparation(config)
  assert "Download" not in message  # the VAE is the random debug one, the exports exist
  commands = [shlex.split(line) for line in message.splitlines()
              if line.strip().startswith("python -m asyncpatch_jax.latents.build")]
  assert [c[-1] for c in commands] == [f"--out={tmp_path}/latents/train",
                                       f"--out={tmp_path}/latents/validation"]
  with pytest.raises(validation.ConfigError, match="is not prepared"):
    validation.validate_config(config)
  parsed = flags.FLAGS.is_parsed()
  try:
    for command in commands:
      flags.FLAGS.unparse_flags()
      flags.FLAGS(command[2:])  # argv[0] is the module name
      build.main(command[2:3])
  finally:
    flags.FLAGS.unparse_flags()
    if parsed:
      flags.FLAGS.mark_as_parsed()
  validation.validate_config(config)
  sharding = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)), P("data"))
  batch = next(pipeline.create_train_pipeline(config.data, sharding))
  assert batch["image"].shape == (8, 4, 4, 4) and batch["image"].dtype == np.float32
  assert float(np.asarray(batch["image"]).std()) > 0
