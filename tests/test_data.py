"""asyncpatch_jax/data: bundled and TFDS sources, preprocessing, and the global-stream pipeline."""

import pathlib
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import data as data_lib  # noqa: E402
from asyncpatch_jax.data import pipeline, sources  # noqa: E402
from asyncpatch_jax.data.preprocess import Preprocess, center_crop_resize, to_channels  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from configs import celeba_hq, cifar10, digits, imagenet, lsun, mnist, textures  # noqa: E402


@pytest.fixture
def tfds_tmp(tmp_path, monkeypatch):
  """TFDS's DatasetInfo leaves a temporary directory per builder: keep them in tmp_path."""
  import tempfile

  (tmp_path / "tfds_tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tfds_tmp"))


def _data_config(**overrides):
  config = digits.get_config("debug").data
  with config.unlocked():
    for k, v in overrides.items():
      config[k] = v
  return config


def test_mnist_source_is_padded_and_split():
  train, test, full = (sources.mnist_source(s) for s in ("train", "test", "all"))
  assert (len(train), len(test), len(full)) == (4500, 500, 5000)
  record = train[0]
  assert record["image"].shape == (32, 32, 1) and record["image"].dtype == np.uint8
  assert np.all(train.images[:, :2] == 0) and np.all(train.images[:, :, -2:] == 0)  # padding
  assert train.images.max() == 255
  assert set(np.unique(test.labels)) == set(range(10))  # held-out split is not class-sorted
  # train and test are disjoint and together the whole set
  pooled = np.concatenate([train.images, test.images]).reshape(5000, -1)
  assert len({row.tobytes() for row in pooled}) == len({r.tobytes()
                                                        for r in full.images.reshape(5000, -1)})


def test_digits_and_textures_sources():
  d = sources.digits_source("all")
  assert len(d) == 1797 and d[5]["image"].shape == (8, 8, 1) and d.images.max() == 255
  t = sources.TextureCrops(32, 30, scale=0.5, seed=3)
  a, b = t[7], t[7]
  assert np.array_equal(a["image"], b["image"]) and a["image"].shape == (32, 32, 1)
  assert {t[i]["label"] for i in range(6)} == {0, 1, 2}
  test = sources.TextureCrops(32, 30, scale=0.5, seed=3, split="test")
  assert not np.array_equal(test[7]["image"], a["image"])
  with pytest.raises(ValueError, match="crop_size"):
    sources.TextureCrops(600, 3)


def test_center_crop_resize_follows_adm():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
  out = center_crop_resize(image, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  # The crop is central: an edge in the middle of the long side lands in the middle.
  for long_axis in (0, 1):
    shape = (500, 300) if long_axis == 0 else (300, 500)
    edge = np.zeros((*shape, 1), np.uint8)
    if long_axis == 0:
      edge[250:] = 255
    else:
      edge[:, 250:] = 255
    profile = center_crop_resize(edge, 64)[..., 0].mean(axis=1 - long_axis)
    assert profile[:30].max() < 5 and profile[34:].min() > 250
  assert np.all(center_crop_resize(np.full((100, 40, 1), 77, np.uint8), 16) == 77)
  assert np.array_equal(center_crop_resize(image[:64, :64], 64), image[:64, :64])
  # BOX halving first (ADM): a one-pixel checkerboard averages to grey instead of aliasing.
  checker = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
  assert np.abs(center_crop_resize(checker, 32).astype(int) - 127).max() <= 1


def test_channels_and_flip():
  grey = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)[..., :1]
  assert to_channels(grey, 3).shape == (2, 2, 3)
  rgb = np.full((2, 2, 3), 100, np.uint8)
  assert np.all(to_channels(rgb, 1) == 100)
  image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  pre = Preprocess(4, 1, random_flip=True)
  flips = [not np.array_equal(pre({"image": image}, (0, g))["image"], image) for g in range(400)]
  assert 150 < sum(flips) < 250  # about half, deterministic per position
  assert flips == [not np.array_equal(pre({"image": image}, (0, g))["image"], image)
                   for g in range(400)]


def _one_device_sharding():
  return NamedSharding(mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}),
                                          jax.devices()[:1]), P(mesh_lib.BATCH_AXES))


def _local_batches(stream_rows, source, seed, n, flip=False):
  pre = Preprocess(8, 1, random_flip=flip)
  stream = pipeline.TrainStream(source, pre, seed=seed, rows=stream_rows)
  size = stream_rows.size
  return [np.stack([stream[k * size + j]["image"] for j in range(size)]) for k in range(n)]


def test_global_stream_does_not_depend_on_the_process_layout():
  source = sources.digits_source("train")
  whole = _local_batches(pipeline.ProcessRows(8, 0, 8), source, seed=5, n=4, flip=True)
  first = _local_batches(pipeline.ProcessRows(8, 0, 4), source, seed=5, n=4, flip=True)
  second = _local_batches(pipeline.ProcessRows(8, 4, 4), source, seed=5, n=4, flip=True)
  for w, a, b in zip(whole, first, second):
    assert np.array_equal(w, np.concatenate([a, b]))


def test_each_epoch_is_a_fresh_permutation():
  source = sources.ArraySource(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 20,
                               np.arange(10))
  stream = pipeline.TrainStream(source, Preprocess(1, 1, crop="resize"), seed=1,
                                rows=pipeline.ProcessRows(5, 0, 5))
  labels = [int(stream[i]["label"]) for i in range(30)]
  epochs = [labels[i:i + 10] for i in (0, 10, 20)]
  assert all(sorted(e) == list(range(10)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  other_seed = pipeline.TrainStream(source, Preprocess(1, 1, crop="resize"), seed=2,
                                    rows=pipeline.ProcessRows(5, 0, 5))
  assert [int(other_seed[i]["label"]) for i in range(10)] != epochs[0]


def test_process_rows_from_the_sharding():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 2}))
  rows = pipeline.process_rows(mesh_lib.batch_sharding(mesh), 16)
  assert rows == pipeline.ProcessRows(16, 0, 16)  # one process holds every row


def test_pipeline_gives_sharded_global_batches_and_resumes_exactly():
  config = _data_config(batch_size=8, image_size=8)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2}))
  sharding = mesh_lib.batch_sharding(mesh)
  pipe = data_lib.create_train_pipeline(config, sharding)
  batches = [next(pipe) for _ in range(3)]
  b = batches[0]
  assert b["image"].shape == (8, 8, 8, 1) and b["image"].dtype == np.uint8
  assert b["label"].shape == (8,) and b["image"].sharding.is_equivalent_to(sharding, 4)
  state = pipe.iterator.get_state()
  expected = [np.asarray(next(pipe)["image"]) for _ in range(2)]
  resumed = data_lib.create_train_pipeline(config, sharding)
  resumed.iterator.set_state(state)
  assert all(np.array_equal(np.asarray(next(resumed)["image"]), e) for e in expected)
  fresh = data_lib.create_train_pipeline(config, sharding)
  assert np.array_equal(np.asarray(next(fresh)["image"]), np.asarray(b["image"]))


def test_worker_processes_give_the_same_stream_and_resume():
  config = textures.get_config("debug").data
  sharding = _one_device_sharding()
  reference = data_lib.create_train_pipeline(config, sharding)
  expected = [np.asarray(next(reference)["image"]) for _ in range(5)]
  reference.close()
  with config.unlocked():
    config.worker_count = 2
  workers = data_lib.create_train_pipeline(config, sharding)
  got = [np.asarray(next(workers)["image"]) for _ in range(3)]
  state = workers.iterator.get_state()
  workers.close()
  resumed = data_lib.create_train_pipeline(config, sharding)
  resumed.iterator.set_state(state)
  got += [np.asarray(next(resumed)["image"]) for _ in range(2)]
  resumed.close()
  assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_eval_pipeline_is_ordered_and_finite():
  config = _data_config(batch_size=8, image_size=8, eval_split="test")
  pipe = data_lib.create_eval_pipeline(config, _one_device_sharding())
  n = len(sources.digits_source("test")) // 8
  assert pipe.num_batches == n
  images = [np.asarray(b["image"]) for b in pipe]
  assert len(images) == n
  src = sources.digits_source("test")
  assert np.array_equal(images[1][3], src[8 + 3]["image"])


def test_reference_images_span_the_split():
  config = mnist.get_config().data
  images, labels = data_lib.reference_images(config, 10)
  assert images.shape == (10, 32, 32, 1) and labels.shape == (10,)
  test = sources.mnist_source("test")
  for image, label, i in zip(images, labels, np.linspace(0, 499, 10).round().astype(int)):
    assert np.array_equal(image, test[int(i)]["image"]) and label == test[int(i)]["label"]
  assert len(set(labels.tolist())) > 3


@pytest.mark.parametrize("config_module, arg", [  # imagenet / lsun: their pixel-space variants
    (cifar10, "debug"), (imagenet, "pixel128,debug"), (lsun, "pixel,debug"),
    (celeba_hq, "debug")], ids=["cifar10", "imagenet2012", "lsun", "celeba_hq"])
def test_tfds_pipelines_on_mock_data(config_module, arg, tfds_tmp):
  config = config_module.get_config(arg)
  with tfds.testing.mock_data(num_examples=24):
    pipe = data_lib.create_train_pipeline(config.data, _one_device_sharding())
    batch = next(pipe)
  size, ch = config.data.image_size, config.data.channels
  assert batch["image"].shape == (8, size, size, ch) and batch["image"].dtype == np.uint8
  if config.model.num_classes:
    assert int(np.asarray(batch["label"]).max()) < config.data.num_classes


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path, tfds_tmp):
  config = cifar10.get_config("debug").data
  with config.unlocked():
    config.tfds_data_dir = str(tmp_path)
  with pytest.raises(data_lib.DatasetNotFoundError,
                     match=r"(?s)cifar10.*tfds build cifar10 .*--file_format=array_record"):
    data_lib.create_train_pipeline(config, _one_device_sharding())
  assert not (tmp_path / "downloads").exists()  # nothing was downloaded


def test_bundled_textures_config_pipeline():
  config = textures.get_config("debug").data
  pipe = data_lib.create_train_pipeline(config, _one_device_sharding())
  assert next(pipe)["image"].shape == (8, 16, 16, 1)
