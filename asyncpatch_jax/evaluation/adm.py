"""ADM's evaluation files, so our FID can be checked against the evaluator that published numbers
use (openai/guided-diffusion `evaluations/evaluator.py`, run by DiT, SiT, REPA and others).

- A *sample batch* is an `.npz` whose `arr_0` is uint8 `[N, H, W, 3]`. `SampleBatchWriter`
  streams one to disk batch by batch (50,000 images of 256² are 9.8 GB: never all in memory).
- A *reference batch* (e.g. `VIRTUAL_imagenet256_labeled.npz`) holds `arr_0` images and the
  Inception pool3 statistics `mu` [2048], `sigma` [2048, 2048] of them (and `mu_s`, `sigma_s`
  of spatial features, for sFID). `read_reference` turns `mu` / `sigma` into our reference
  statistics; `iter_images` streams `arr_0`, so our network's statistics of the same images can
  be compared with theirs (`frechet_distance` of the two: ~0 when the networks agree).

Both evaluators use the TF Inception-v3 of 2015-12-05 (ours: `evaluation/inception.py`).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from asyncpatch_jax import file_io, pixels
from asyncpatch_jax.evaluation.fid import (
    FeatureStats,
    ReferenceStatistics,
    feature_statistics,
    frechet_distance,
)

IMAGES = "arr_0"
_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches"
# ADM's reference batches (guided-diffusion's evaluations/README.md), by file name.
REFERENCE_URLS = {
    "VIRTUAL_imagenet64_labeled.npz": f"{_ADM}/imagenet/64/VIRTUAL_imagenet64_labeled.npz",
    "VIRTUAL_imagenet128_labeled.npz": f"{_ADM}/imagenet/128/VIRTUAL_imagenet128_labeled.npz",
    "VIRTUAL_imagenet256_labeled.npz": f"{_ADM}/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    "VIRTUAL_lsun_bedroom256.npz": f"{_ADM}/lsun/bedroom/VIRTUAL_lsun_bedroom256.npz",
}


def _open_member(archive: zipfile.ZipFile, key: str, path: str) -> Any:
  try:
    return archive.open(f"{key}.npy")
  except KeyError:
    raise ValueError(f"{path} has no {key!r} array (keys: "
                     f"{[n.removesuffix('.npy') for n in archive.namelist()]}); ADM's files hold "
                     f"'{IMAGES}' (and a reference batch 'mu' and 'sigma')") from None


def _header(stream: Any, path: str, key: str) -> tuple[tuple[int, ...], np.dtype, bool]:
  version = np.lib.format.read_magic(stream)
  read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
          else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read(stream)
  if dtype.hasobject:
    raise ValueError(f"{path}: {key!r} holds Python objects, not an array")
  return shape, dtype, fortran


def array_shape(path: str | os.PathLike[str], key: str = IMAGES
                ) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of one array of an `.npz`, read from its header only (not the data)."""
  path = os.fspath(path)
  with zipfile.ZipFile(path) as archive, _open_member(archive, key, path) as stream:
    shape, dtype, _ = _header(stream, path, key)
  return shape, dtype


def iter_images(path: str | os.PathLike[str], batch_size: int = 500) -> Iterator[np.ndarray]:
  """`arr_0` of an ADM batch, uint8 `[≤batch_size, H, W, 3]` at a time, streamed from disk."""
  path = os.fspath(path)
  with zipfile.ZipFile(path) as archive, _open_member(archive, IMAGES, path) as stream:
    shape, dtype, fortran = _header(stream, path, IMAGES)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
      raise ValueError(f"{path}: '{IMAGES}' is {dtype} {list(shape)}; ADM's format is uint8 "
                       f"[N, H, W, 3] (C order)")
    row = int(np.prod(shape[1:]))
    for start in range(0, shape[0], batch_size):
      n = min(batch_size, shape[0] - start)
      data = stream.read(n * row)
      if len(data) != n * row:
        raise ValueError(f"{path}: '{IMAGES}' ends after {start + len(data) // row} of "
                         f"{shape[0]} images (a truncated file)")
      yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def read_reference(path: str | os.PathLike[str]) -> ReferenceStatistics:
  """An ADM reference batch's `mu` / `sigma` as reference statistics (no features, so FID only:
  KID needs our features of `arr_0`, e.g. `FeatureExtractor.features(iter_images(path))`).
  `path` may be a bucket URL (read through a local copy)."""
  name = epath.Path(path).name
  if not epath.Path(path).is_file():
    where = REFERENCE_URLS.get(name, "openai/guided-diffusion's evaluations/README.md")
    raise FileNotFoundError(f"ADM reference batch {os.fspath(path)!r} not found; download {where} "
                            f"and pass --config.eval.fid_reference=PATH (or '' for the statistics "
                            f"of eval.fid_split)")
  with file_io.local_file(path) as local:
    with np.load(local, allow_pickle=False) as data:
      missing = [k for k in ("mu", "sigma") if k not in data.files]
      if missing:
        raise ValueError(f"{path} has no {missing}: not an ADM reference batch (its keys: "
                         f"{data.files}); pass e.g. VIRTUAL_imagenet256_labeled.npz from "
                         f"openai/guided-diffusion's evaluations")
      mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    with zipfile.ZipFile(local) as archive:
      has_images = f"{IMAGES}.npy" in archive.namelist()
    count = array_shape(local)[0][0] if has_images else 0
  name = name.removesuffix(".npz")
  return ReferenceStatistics(name=f"adm-{name}", stats=FeatureStats(mean=mu, cov=sigma,
                                                                    count=int(count)),
                             features=None, fingerprint=f"adm-evaluator:{name}")


def agreement(path: str | os.PathLike[str], extractor: Any, batch_size: int = 500) -> float:
  """FID between our statistics of a reference batch's images (`extractor.features`, e.g. a
  `FeatureExtractor`) and the batch's own `mu` / `sigma` (ADM's network): near 0 when our
  Inception and its preprocessing match ADM's, so our FIDs compare with published ones."""
  ours = feature_statistics(extractor.features(iter_images(path, batch_size)))
  return frechet_distance(ours, read_reference(path).stats)


class SampleBatchWriter:
  """Writes an ADM sample batch `arr_0` uint8 `[num, H, W, 3]` to `path`, `add`ed in order.

  The `.npz` is written through `file_io.atomic_open`, in place when exactly `num` images were
  added (`close`, or leaving the `with` block); an error leaves no partial file behind. Images
  may be uint8 or float in [-1, 1] (`pixels.to_uint8`); one channel is repeated to three.
  """

  def __init__(self, path: str | os.PathLike[str], num: int, image_shape: tuple[int, int]):
    self.path, self.num = os.fspath(path), int(num)
    self.shape = (self.num, int(image_shape[0]), int(image_shape[1]), 3)
    self.written = 0
    self._file = contextlib.ExitStack()  # holds the atomic write open across `add` calls
    self._zip = zipfile.ZipFile(self._file.enter_context(file_io.atomic_open(self.path, "wb")),
                                "w", zipfile.ZIP_STORED, allowZip64=True)
    self._stream = self._zip.open(f"{IMAGES}.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_1_0(
        self._stream, {"descr": "|u1", "fortran_order": False, "shape": self.shape})

  def add(self, images: Any) -> None:
    """Appends a batch `[B, H, W, C]` (C 1 or 3); more than `num` images in all is an error."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    if images.ndim != 4 or images.shape[1:] != self.shape[1:]:
      raise ValueError(f"images {images.shape} do not match the batch's {list(self.shape[1:])}")
    if self.written + len(images) > self.num:
      raise ValueError(f"{self.written} + {len(images)} images exceed the {self.num} declared")
    uint8 = images if images.dtype == np.uint8 else pixels.to_uint8(images)
    self._stream.write(np.ascontiguousarray(uint8).tobytes())
    self.written += len(images)

  def close(self) -> None:
    """Finishes the file; fewer than `num` images is an error (and no file)."""
    if self.written != self.num:
      error = ValueError(f"{self.path}: {self.written} of {self.num} images were added")
      self.abort(error)
      raise error
    self._stream.close()
    self._zip.close()
    self._file.close()  # renames the finished file into place

  def abort(self, error: BaseException | None = None) -> None:
    """Drops the partial file (`error`, if given, is what ended the writing)."""
    self._stream.close()
    self._zip.close()
    error = error or RuntimeError(f"{self.path}: sample batch aborted")
    self._file.__exit__(type(error), error, error.__traceback__)  # removes the temporary

  def __enter__(self) -> SampleBatchWriter:
    return self

  def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
    if kind is None:
      self.close()
    else:
      self.abort(error)


def write_sample_batch(path: str | os.PathLike[str], images: Any) -> None:
  """All of `images` `[N, H, W, C]` as an ADM sample batch at `path`."""
  images = np.asarray(images)
  with SampleBatchWriter(path, len(images), images.shape[1:3]) as writer:
    writer.add(images)
