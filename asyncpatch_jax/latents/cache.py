"""Latent caches: a data set encoded once by the VAE, read back by training through grain.

Encoding the images on every training step costs more than the DiT itself at 256²; fast-DiT
encodes once and trains about twice as fast. `build_latent_cache` encodes a split in global
batches sharded over a 1-D `data` mesh, each image together with its horizontal flip, and writes
the posterior moments (mean and log-variance, so training can draw a fresh z each epoch) and the
label into ArrayRecord shards of `shard_size` examples:

    CACHE_DIR/metadata.json                           what wrote it: VAE fingerprint, size, …
    CACHE_DIR/latents-00000-of-00128.array_record     examples [0, shard_size), in order
    …

A shard is written under a `.tmp` name and renamed when complete, so an interrupted build
resumes by skipping the complete shards (and rewriting the one it was in). `LatentCacheSource`
reads a complete cache as a grain random-access source and refuses one written by a different
VAE, at a different resolution or with a different scaling factor. `LatentPreprocess` turns a
record into a training example (pick a view, sample z, scale), seeded by the stream position like
`data.Preprocess`, so the training pipeline's `TrainStream` takes it in place of `Preprocess`.
Images are cropped as ADM does (`data.preprocess.center_crop_resize`, which upscales the few
ImageNet images smaller than the crop, as ADM and DiT do).

Each record is `label` (int32, little-endian) followed by `moments[view, stat, h, w, c]` in the
cache's storage dtype, view 0 the image and 1 its mirror image, stat 0 the mean and 1 the
log-variance, on the VAE's own (unscaled) latent scale.
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
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax.autoencoder.vae import AutoencoderKL
from asyncpatch_jax.autoencoder.weights import params_fingerprint
from asyncpatch_jax.data.preprocess import center_crop_resize, to_channels
from asyncpatch_jax.progress import Progress

FORMAT = "asyncpatch_jax/latent-cache/v1"
METADATA = "metadata.json"
STORAGE_DTYPES = ("float32", "float16")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access


class LatentCacheNotFoundError(FileNotFoundError):
  """No (complete) cache where the config points; the message says how to build it."""


class LatentCacheMismatchError(ValueError):
  """A cache written by a different VAE, resolution or scaling factor than the run expects."""


def shard_name(index: int, num_shards: int) -> str:
  return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D `data` mesh over `devices` (default: all) with automatic (GSPMD) sharding."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


def vae_identity(vae: AutoencoderKL, weights_file: str | None = None) -> dict[str, Any]:
  """What identifies the VAE in a cache's metadata (the fingerprint is what is checked)."""
  return {"fingerprint": params_fingerprint(vae), "config": vae.config.to_dict(),
          "compute_dtype": str(vae.dtype),
          "weights_file": os.path.basename(weights_file) if weights_file else ""}


def build_command_hint() -> str:
  """A generic build command; a run's config prints its exact ones (`latents.prepare`)."""
  weights = "--vae_config=sd --vae_weights=PATH/diffusion_pytorch_model.safetensors"
  return (f"python -m asyncpatch_jax.latents.build --source=tfds --tfds_name=imagenet2012 "
          f"--split=train --image_size=256 {weights} --out=CACHE_DIR\n  (LSUN: --source=lsun "
          f"--lsun_lmdb=PATH/church_outdoor_train_lmdb instead of the TFDS flags; the VAE weights "
          f"are stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors; a run's cache of "
          f"split S lives in <data.latent_dir>/S)")


# ---------------------------------------------------------------------------------------------
# Writing.


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
    x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
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
  from jax.experimental import multihost_utils
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
  meta_path = os.path.join(cache_dir, METADATA)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      _check_resume(json.load(f), metadata, cache_dir)
  elif is_writer:
    os.makedirs(cache_dir, exist_ok=True)
    _write_json(meta_path, metadata)

  def complete(k: int) -> bool:
    return os.path.exists(os.path.join(cache_dir, shard_name(k, num_shards)))

  todo = np.array([not complete(k) for k in range(num_shards)], np.bool_)
  if jax.process_count() > 1:  # every process must run the same steps
    from jax.experimental import multihost_utils
    todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  if log and todo.sum() < num_shards:
    log(f"latent cache {cache_dir}: {num_shards - int(todo.sum())} of {num_shards} shards "
        f"already complete, resuming")

  from asyncpatch_jax.data.pipeline import process_rows  # the pipeline's row convention

  sharding = NamedSharding(mesh, P("data"))
  rows = process_rows(sharding, batch_size)
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
    final = os.path.join(cache_dir, shard_name(int(k), num_shards))
    tmp = final + ".tmp"
    writer = None
    if is_writer:
      from array_record.python.array_record_module import ArrayRecordWriter
      writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      _encode_shard(stream, encode, sharding, writer, batch_size, hi - lo,
                    np.dtype(storage_dtype).newbyteorder("<"))
    except BaseException:
      if writer is not None:
        writer.close()
        os.remove(tmp)  # the shard is rewritten from its start on resume
      raise
    if writer is not None:
      writer.close()
      os.replace(tmp, final)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"latent cache shard {k}")
    progress.update(hi - lo)  # logs `done / total images, rate, ETA` after every shard
  metadata["complete"] = True
  if is_writer:
    missing = [k for k in range(num_shards) if not complete(k)]
    if missing:
      raise RuntimeError(f"latent cache {cache_dir}: shards {missing} were not written")
    _write_json(meta_path, metadata)
  return metadata


def _write_json(path: str, data: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading.


def read_metadata(cache_dir: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(os.fspath(cache_dir), METADATA)
  if not os.path.exists(path):
    raise LatentCacheNotFoundError(
        f"no latent cache in {os.fspath(cache_dir)!r} (no {METADATA}). Build it once with\n  "
        f"{build_command_hint()}\n(rerun the same command to resume an interrupted build).")
  with open(path) as f:
    metadata = json.load(f)
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
  cache that does not match them.
  """

  def __init__(self, cache_dir: str | os.PathLike, *, vae: AutoencoderKL | str | None = None,
               image_size: int | None = None, scaling_factor: float | None = None):
    self.cache_dir = os.fspath(cache_dir)
    self.metadata = read_metadata(self.cache_dir)
    num_shards = self.metadata["num_shards"]
    paths = [os.path.join(self.cache_dir, shard_name(k, num_shards)) for k in range(num_shards)]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
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
    self._records = grain.sources.ArrayRecordDataSource(paths)
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
