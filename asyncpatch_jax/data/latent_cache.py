"""Reading latent caches: a data set encoded once by the VAE (`latents.encode`), read back by
training as a grain random-access source.

    CACHE_DIR/metadata.json                           what wrote it: VAE fingerprint, size, …
    CACHE_DIR/latents-00000-of-00128.array_record     examples [0, shard_size), in order
    …

Each record is `label` (int32, little-endian) followed by `moments[view, stat, h, w, c]` in the
cache's storage dtype, view 0 the image and 1 its mirror image, stat 0 the mean and 1 the
log-variance, on the VAE's own (unscaled) latent scale.

`LatentCacheSource` reads a complete cache and refuses one written by a different VAE, at a
different resolution or with a different scaling factor. `LatentPreprocess` turns a record into a
training example (pick a view, sample z, scale), seeded by the stream position like
`data.Preprocess`, so the training pipeline's `TrainStream` takes it in place of `Preprocess`.

`CACHE_DIR` may be a bucket URL (`gs://…`): the metadata is read through `etils.epath`, and the
shards, which array_record reads from local files, are copied once to local disk
(`data.staging`) and read from there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# The reader that grain's `ArrayRecordDataSource` wraps, imported without grain so that
# `data.sources` (the example shapes the train step reads) stays light.
from array_record.python.array_record_data_source import ArrayRecordDataSource
from etils import epath

from asyncpatch_jax.autoencoder.vae import AutoencoderKL
from asyncpatch_jax.autoencoder.weights import params_fingerprint
from asyncpatch_jax.data import staging

FORMAT = "asyncpatch_jax/latent-cache/v1"
METADATA = "metadata.json"


class LatentCacheNotFoundError(FileNotFoundError):
  """No (complete) cache where the config points; the message says how to build it."""


class LatentCacheMismatchError(ValueError):
  """A cache written by a different VAE, resolution or scaling factor than the run expects."""


def shard_name(index: int, num_shards: int) -> str:
  """The file name of shard `index` of `num_shards`."""
  return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def build_command_hint() -> str:
  """A generic build command; a run's config prints its exact ones (`data.preparation`)."""
  weights = "--vae_config=sd --vae_weights=PATH/diffusion_pytorch_model.safetensors"
  return (f"python -m asyncpatch_jax.latents.build --source=tfds --tfds_name=imagenet2012 "
          f"--split=train --image_size=256 {weights} --out=CACHE_DIR\n  (LSUN: --source=lsun "
          f"--lsun_lmdb=PATH/church_outdoor_train_lmdb instead of the TFDS flags; the VAE weights "
          f"are stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors; a run's cache of "
          f"split S lives in <data.latent_dir>/S)")


def read_metadata(cache_dir: str | os.PathLike) -> dict[str, Any]:
  """The cache's `metadata.json`; `LatentCacheNotFoundError` (with the build command) if absent."""
  path = epath.Path(cache_dir) / METADATA
  if not path.exists():
    raise LatentCacheNotFoundError(
        f"no latent cache in {os.fspath(cache_dir)!r} (no {METADATA}). Build it once with\n  "
        f"{build_command_hint()}\n(rerun the same command to resume an interrupted build).")
  metadata = json.loads(path.read_text())
  if metadata.get("format") != FORMAT:
    raise LatentCacheMismatchError(f"{path}: format {metadata.get('format')!r}, this code reads "
                                   f"{FORMAT!r}; rebuild the cache")
  return metadata


def check_metadata(metadata: dict[str, Any], *, vae: AutoencoderKL | str | None = None,
                   image_size: int | None = None, scaling_factor: float | None = None,
                   where: str = "") -> None:
  """Raises `LatentCacheMismatchError` listing every way the cache differs from the run."""
  diffs = []
  if vae is not None:
    fingerprint = vae if isinstance(vae, str) else params_fingerprint(vae)
    if metadata["vae"]["fingerprint"] != fingerprint:
      file = metadata["vae"].get("weights_file") or "randomly initialised or in-memory weights"
      diffs.append(f"VAE: the cache was encoded by a different VAE ({file}, fingerprint "
                   f"{metadata['vae']['fingerprint'][:12]}…) than this run's "
                   f"({fingerprint[:12]}…)")
    if not isinstance(vae, str) and scaling_factor is None:
      scaling_factor = vae.config.scaling_factor
  if image_size is not None and metadata["image_size"] != int(image_size):
    diffs.append(f"resolution: cache {metadata['image_size']}, run {int(image_size)}")
  if scaling_factor is not None and not math.isclose(metadata["scaling_factor"],
                                                     float(scaling_factor)):
    diffs.append(f"scaling factor: cache {metadata['scaling_factor']}, run {scaling_factor}")
  if diffs:
    raise LatentCacheMismatchError(
        f"latent cache {where} does not match this run: " + "; ".join(diffs)
        + f". Rebuild it for this run's settings:\n  {build_command_hint()}")


class LatentCacheSource:
  """A complete latent cache as a random-access source (grain `RandomAccessDataSource`).

  Records are `{'mean': float32 [2, h, w, c], 'logvar': float32 [2, h, w, c], 'label': int}`,
  axis 0 the view (0 the image, 1 its mirror image), on the VAE's unscaled latent scale. Pass
  `vae` (the run's VAE or its fingerprint), `image_size` and/or `scaling_factor` to refuse a
  cache that does not match them. A cache on a bucket is read from a local copy
  (`data.staging`, made on first use).
  """

  def __init__(self, cache_dir: str | os.PathLike, *, vae: AutoencoderKL | str | None = None,
               image_size: int | None = None, scaling_factor: float | None = None):
    self.cache_dir = os.fspath(cache_dir)
    self.metadata = read_metadata(self.cache_dir)
    num_shards = self.metadata["num_shards"]
    names = [shard_name(k, num_shards) for k in range(num_shards)]
    missing = [n for n in names if not (epath.Path(self.cache_dir) / n).exists()]
    if not self.metadata.get("complete") or missing:
      raise LatentCacheNotFoundError(
          f"latent cache {self.cache_dir!r} is incomplete ({num_shards - len(missing)} of "
          f"{num_shards} shards); rerun the command that built it to resume:\n  "
          f"{build_command_hint()}")
    check_metadata(self.metadata, vae=vae, image_size=image_size, scaling_factor=scaling_factor,
                   where=repr(self.cache_dir))
    self.latent_shape = tuple(self.metadata["latent_shape"])
    self.scaling_factor = float(self.metadata["scaling_factor"])
    self._dtype = np.dtype(self.metadata["storage_dtype"]).newbyteorder("<")
    self._moments_shape = (2, 2, *self.latent_shape)
    self._record_bytes = 4 + math.prod(self._moments_shape) * self._dtype.itemsize
    local = epath.Path(staging.stage(self.cache_dir, names))
    self._records = ArrayRecordDataSource([os.fspath(local / n) for n in names])
    if len(self._records) != self.metadata["num_examples"]:
      raise ValueError(f"latent cache {self.cache_dir!r} holds {len(self._records)} records, "
                       f"its metadata says {self.metadata['num_examples']}; rebuild it")

  def __len__(self) -> int:
    return len(self._records)

  def _decode(self, raw: bytes) -> dict[str, Any]:
    if len(raw) != self._record_bytes:
      raise ValueError(f"latent cache {self.cache_dir!r}: a record of {len(raw)} bytes, "
                       f"expected {self._record_bytes}")
    label = int(np.frombuffer(raw[:4], "<i4")[0])
    moments = np.frombuffer(raw[4:], self._dtype).reshape(self._moments_shape)
    moments = moments.astype(np.float32)
    return {"mean": moments[:, 0], "logvar": moments[:, 1], "label": label}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._decode(self._records[int(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._decode(r) for r in self._records.__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return f"LatentCacheSource({self.cache_dir!r}, {len(self)} examples)"


class LatentPreprocess:
  """Cache record → `{'image': float32 [h, w, c] scaled latent, 'label': int32}`; picklable.

  The key is the pipeline's `'image'` (the diffusion model's data x0, whatever space it lives
  in), so the training step reads latent and pixel batches alike.

  With `flip_key` (the stream position, as `data.Preprocess` takes it): a random view when
  `random_flip`, and z drawn from the posterior when `sample`, both from one numpy generator
  seeded by the key, so the example does not depend on workers or processes. Without it (eval):
  the unflipped view's posterior mean.
  """

  def __init__(self, scaling_factor: float, *, random_flip: bool = True, sample: bool = True):
    self.scaling_factor = float(scaling_factor)
    self.random_flip, self.sample = bool(random_flip), bool(sample)

  def __call__(self, record: dict[str, Any], flip_key: tuple[int, ...] | None = None
               ) -> dict[str, np.ndarray]:
    mean, logvar = record["mean"], record["logvar"]
    view, z = 0, None
    if flip_key is not None:
      rng = np.random.default_rng(list(flip_key))
      if self.random_flip:
        view = int(rng.random() < 0.5)
      if self.sample:
        noise = rng.standard_normal(mean.shape[1:], dtype=np.float32)
        z = mean[view] + np.exp(0.5 * logvar[view]) * noise
    if z is None:
      z = mean[view]
    return {"image": np.asarray(z * self.scaling_factor, np.float32),
            "label": np.int32(record.get("label", 0))}
