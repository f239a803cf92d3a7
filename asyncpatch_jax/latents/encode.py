"""Encoding a data set into a latent cache once, before latent-diffusion training (the reader is
`data.latent_cache`; the command line is `latents.build`).

Encoding the images on every training step costs more than the DiT itself at 256²; fast-DiT
encodes once and trains about twice as fast. `build_latent_cache` encodes a split in global
batches sharded over a 1-D `data` mesh, each image together with its horizontal flip, and writes
the posterior moments (mean and log-variance, so training can draw a fresh z each epoch) and the
label into ArrayRecord shards of `shard_size` examples (the layout is `data.latent_cache`'s).

A shard is written under a hidden temporary name and renamed when complete (`file_io`), so an
interrupted build resumes by skipping the complete shards (and rewriting the one it was in).
Images are cropped as ADM does (`data.preprocess.center_crop_resize`, which upscales the few
ImageNet images smaller than the crop, as ADM and DiT do). The cache folder may be a bucket URL
(`gs://…`): the metadata goes through `etils.epath` and each shard, which array_record writes to
a local file, is uploaded when complete (`file_io.atomic_path`). An LSUN export on a bucket is
copied to local disk first (`data.staging`; LMDB reads local files only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import file_io, pixels
from asyncpatch_jax.autoencoder.vae import AutoencoderKL
from asyncpatch_jax.autoencoder.weights import params_fingerprint
from asyncpatch_jax.data import staging
from asyncpatch_jax.data.latent_cache import (
    FORMAT,
    METADATA,
    LatentCacheMismatchError,
    shard_name,
)
from asyncpatch_jax.data.pipeline import process_rows
from asyncpatch_jax.data.preprocess import center_crop_resize, to_channels
from asyncpatch_jax.data.sources import TfdsSource
from asyncpatch_jax.latents.lsun import LsunSource
from asyncpatch_jax.progress import Progress

STORAGE_DTYPES = ("float32", "float16")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D `data` mesh over `devices` (default: all) with automatic (GSPMD) sharding."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def vae_identity(vae: AutoencoderKL, weights_file: str | None = None) -> dict[str, Any]:
  """What identifies the VAE in a cache's metadata (the fingerprint is what is checked)."""
  return {"fingerprint": params_fingerprint(vae), "config": vae.config.to_dict(),
          "compute_dtype": str(vae.dtype),
          "weights_file": epath.Path(weights_file).name if weights_file else ""}


def make_source(source: str, *, image_size: int, tfds_name: str = "", split: str = "train",
                tfds_data_dir: str = "", label_key: str = "label", lsun_lmdb: str = "",
                lsun_small_images: str = "error") -> tuple[Any, str]:
  """The random-access image source a cache is encoded from ('tfds' or 'lsun') and a name for
  the cache metadata; also the images of a latent run's FID reference statistics."""
  if source == "tfds":
    return (TfdsSource(tfds_name, split, tfds_data_dir or None, label_key or None),
            f"tfds:{tfds_name}/{split}")
  if source == "lsun":
    if not lsun_lmdb:
      raise FileNotFoundError("--source=lsun needs --lsun_lmdb=DIR (the export holding data.mdb)")
    name = epath.Path(lsun_lmdb).name
    lmdb_dir = epath.Path(staging.stage(lsun_lmdb))  # a bucket's export: a local copy
    # Listing 3M keys takes a while: keep the list next to the export unless that is read-only.
    keys_file = lmdb_dir.parent / f"{lmdb_dir.name}_keys_{lsun_small_images}_{image_size}.txt"
    if not (keys_file.exists() or os.access(os.fspath(keys_file.parent), os.W_OK)):
      keys_file = None
    return (LsunSource(lmdb_dir, image_size=image_size, small_images=lsun_small_images,
                       keys_file=keys_file),
            f"lsun:{name}")
  raise ValueError(f"unknown source {source!r}; choose 'tfds' or 'lsun'")


@dataclasses.dataclass
class _LoadImage:
  """Source index → uint8 `[size, size, 3]` image (ADM centre crop + resize) and label."""

  source: Any
  image_size: int

  def __call__(self, index: int) -> tuple[np.ndarray, np.int32]:
    record = self.source[int(index)]
    image = np.asarray(record["image"])
    if image.dtype != np.uint8:
      raise ValueError(f"record {index}: expected a uint8 image, got {image.dtype}")
    image = center_crop_resize(to_channels(image, 3), self.image_size)
    return np.ascontiguousarray(image), np.int32(record.get("label", 0))


def _encoder(vae: AutoencoderKL, mesh: Mesh, storage_dtype: str) -> Callable[..., jax.Array]:
  """jit: uint8 images `[B, H, W, 3]` (batch over `data`) → moments `[B, 2, 2, h, w, c]`."""
  graphdef, state = nnx.split(vae)
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.device_put(state, replicated)

  @jax.jit
  def encode(state, images):
    model = nnx.merge(graphdef, state)
    x = pixels.to_model_range(images)
    views = jnp.stack([x, x[:, :, ::-1]], axis=1)                 # [B, 2, H, W, 3]
    dist = model.encode(views.reshape(-1, *views.shape[2:]))
    moments = jnp.stack([dist.mean, dist.logvar], axis=1)          # [2B, 2, h, w, c]
    moments = moments.reshape(x.shape[0], 2, *moments.shape[1:])
    return jax.lax.with_sharding_constraint(moments.astype(storage_dtype), batch)

  return lambda images: encode(state, images)


def _to_host(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array on every host (only process 0 uses it)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _encode_shard(stream: Any, encode: Callable[[jax.Array], jax.Array],
                  sharding: NamedSharding, writer: Any, batch_size: int, num_valid: int,
                  record_dtype: np.dtype) -> None:
  """Encodes a shard's batches; process 0 (`writer` not None) writes its `num_valid` records.

  Batch b is fetched and written after batch b + 1 is dispatched, so the devices do not wait
  for the host.
  """
  def write(b: int, moments: jax.Array, labels: jax.Array) -> None:
    moments, labels = _to_host(moments), _to_host(labels)
    if writer is not None:
      for r in range(min(batch_size, num_valid - b * batch_size)):
        writer.write(np.int32(labels[r]).astype("<i4").tobytes()
                     + np.ascontiguousarray(moments[r]).astype(record_dtype).tobytes())

  pending = None
  for b, (images, labels) in enumerate(stream):
    shape = (batch_size, *images.shape[1:])
    dispatched = (b, encode(jax.make_array_from_process_local_data(sharding, images, shape)),
                  jax.make_array_from_process_local_data(sharding, labels, (batch_size,)))
    if pending is not None:
      write(*pending)
    pending = dispatched
  if pending is not None:
    write(*pending)


def _check_resume(existing: dict[str, Any], metadata: dict[str, Any], cache_dir: str) -> None:
  keys = ("format", "vae", "image_size", "scaling_factor", "latent_shape", "storage_dtype",
          "num_examples", "shard_size", "num_shards", "source")
  diffs = [f"{k}: cache {existing.get(k)!r} vs now {metadata[k]!r}" for k in keys
           if existing.get(k) != metadata[k]]
  if diffs:
    raise LatentCacheMismatchError(
        f"{cache_dir} holds a cache written with different settings; resuming would mix them. "
        f"Use a new directory or delete it. Differences: " + "; ".join(diffs))


def build_latent_cache(source: Any, vae: AutoencoderKL, cache_dir: str | os.PathLike, *,
                       image_size: int, batch_size: int, shard_size: int = 10_240,
                       mesh: Mesh | None = None, storage_dtype: str = "float32",
                       source_name: str = "", weights_file: str | None = None,
                       num_threads: int = 8, log: Callable[[str], None] | None = print
                       ) -> dict[str, Any]:
  """Encodes every record of `source` (`{'image': uint8 [H, W, C], 'label'}` by index).

  `batch_size` is the global batch, split over the mesh's `data` axis; each process loads only
  its rows and process 0 writes. Batches do not cross shards, so make `shard_size` a multiple of
  `batch_size` to avoid padded batches. Returns the metadata of the complete cache. Resumable:
  run it again with the same arguments after an interruption.
  """
  cache_dir = os.fspath(cache_dir)
  mesh = data_mesh() if mesh is None else mesh
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, not {storage_dtype!r}")
  num_devices = mesh.shape["data"]
  if batch_size <= 0 or batch_size % num_devices:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {num_devices} "
                     f"devices of the mesh's 'data' axis")
  if shard_size <= 0:
    raise ValueError(f"shard_size must be positive, got {shard_size}")
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"data source {source!r} is empty")
  latent_shape = vae.config.latent_shape(image_size)
  num_shards = math.ceil(num_examples / shard_size)
  metadata = {
      "format": FORMAT,
      "vae": vae_identity(vae, weights_file),
      "image_size": int(image_size),
      "scaling_factor": float(vae.config.scaling_factor),
      "latent_shape": list(latent_shape),
      "storage_dtype": storage_dtype,
      "record": "int32 label, then moments[view (image, flipped), stat (mean, logvar), h, w, c]",
      "preprocessing": "ADM centre crop + resize",
      "num_examples": int(num_examples),
      "shard_size": int(shard_size),
      "num_shards": int(num_shards),
      "source": source_name or type(source).__name__,
      "complete": False,
  }
  is_writer = jax.process_index() == 0
  root = epath.Path(cache_dir)
  meta_path = root / METADATA
  if meta_path.exists():
    _check_resume(json.loads(meta_path.read_text()), metadata, cache_dir)
  elif is_writer:
    root.mkdir(parents=True, exist_ok=True)
    file_io.write_json(meta_path, metadata)

  def complete(k: int) -> bool:
    return (root / shard_name(k, num_shards)).exists()

  todo = np.array([not complete(k) for k in range(num_shards)], np.bool_)
  if jax.process_count() > 1:  # every process must run the same steps
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  if log and todo.sum() < num_shards:
    log(f"latent cache {cache_dir}: {num_shards - int(todo.sum())} of {num_shards} shards "
        f"already complete, resuming")

  sharding = NamedSharding(mesh, P("data"))
  rows = process_rows(sharding, batch_size)  # the training pipeline's row convention
  encode = _encoder(vae, mesh, storage_dtype)
  load = _LoadImage(source, int(image_size))
  todo_examples = sum(min((int(k) + 1) * shard_size, num_examples) - int(k) * shard_size
                      for k in np.flatnonzero(todo))
  progress = Progress(f"latent cache {cache_dir}", todo_examples, unit="images", every_secs=0,
                      log=log or (lambda line: None))
  for k in np.flatnonzero(todo):
    lo, hi = int(k) * shard_size, min((int(k) + 1) * shard_size, num_examples)
    num_batches = math.ceil((hi - lo) / batch_size)
    # This process's rows of each global batch; the last batch is padded with the last example.
    positions = [min(lo + b * batch_size + rows.start + j, hi - 1)
                 for b in range(num_batches) for j in range(rows.size)]
    stream = (grain.MapDataset.source(positions).map(load)
              .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=2 * rows.size))
              .batch(rows.size, drop_remainder=False))
    record_dtype = np.dtype(storage_dtype).newbyteorder("<")
    if is_writer:  # an interrupted shard leaves no file: it is rewritten from its start on resume
      with file_io.atomic_path(root / shard_name(int(k), num_shards)) as tmp:
        writer = ArrayRecordWriter(os.fspath(tmp), _WRITER_OPTIONS)
        try:
          _encode_shard(stream, encode, sharding, writer, batch_size, hi - lo, record_dtype)
        finally:
          writer.close()
    else:
      _encode_shard(stream, encode, sharding, None, batch_size, hi - lo, record_dtype)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"latent cache shard {k}")
    progress.update(hi - lo)  # logs `done / total images, rate, ETA` after every shard
  metadata["complete"] = True
  if is_writer:
    missing = [k for k in range(num_shards) if not complete(k)]
    if missing:
      raise RuntimeError(f"latent cache {cache_dir}: shards {missing} were not written")
    file_io.write_json(meta_path, metadata)
  return metadata


