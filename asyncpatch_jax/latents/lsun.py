"""LSUN scenes (bedroom, church_outdoor, …) read straight from the official LMDB exports.

Get them with the LSUN tools (github.com/fyu/lsun: `python download.py -c bedroom`) or from
http://dl.yf.io/lsun/scenes/ (`bedroom_train_lmdb.zip`, `church_outdoor_train_lmdb.zip`), and
unzip: each is a directory with `data.mdb` whose values are the encoded images (webp, some
exports jpeg) keyed by an image id. The source lists the keys once (LMDB keeps them sorted, so
the order is fixed), optionally caching the list in a file, and decodes on access with ADM's
centre crop + resize, the preprocessing of the ADM / DDPM LSUN numbers.

Images whose short side is below the crop size are an `ImageTooSmallError` when read
(`small_images='error'`, the default; LSUN scenes are stored with a short side of 256, so at 256
and below none is expected), or are dropped while listing the keys (`small_images='skip'`,
which reads every image's header once; `num_skipped` counts them).

py-lmdb opens local files only: an export on a bucket is copied to local disk first
(`latents.encode.make_source` through `data.staging`).
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from asyncpatch_jax import file_io
from asyncpatch_jax.data.preprocess import center_crop_resize
from asyncpatch_jax.data.sources import DatasetNotFoundError

SMALL_IMAGE_POLICIES = ("error", "skip")

# py-lmdb allows one open environment per export and process, so sources over the same export
# share it. A forked child keeps using its parent's read-only environment (as torchvision's
# LSUN reader does in DataLoader workers); a spawned one (grain) opens its own.
_ENVIRONMENTS: dict[str, Any] = {}
_ENVIRONMENTS_LOCK = threading.Lock()


def _environment(path: str) -> Any:
  key = os.path.realpath(path)
  env = _ENVIRONMENTS.get(key)
  if env is None:
    import lmdb  # optional: only LSUN sources need py-lmdb

    with _ENVIRONMENTS_LOCK:
      if key not in _ENVIRONMENTS:
        _ENVIRONMENTS[key] = lmdb.open(path, subdir=os.path.isdir(path), readonly=True,
                                       lock=False, readahead=False, meminit=False,
                                       max_readers=512)
      env = _ENVIRONMENTS[key]
  return env


class ImageTooSmallError(ValueError):
  """An image is smaller than the crop; upscaling it would silently blur the data set."""


def missing_lsun_message(path: str) -> str:
  name = epath.Path(path).name or "CATEGORY_train_lmdb"
  return (f"LSUN LMDB {path!r} not found. Download the export with the LSUN tools "
          f"(git clone https://github.com/fyu/lsun; python download.py -c bedroom) or from "
          f"http://dl.yf.io/lsun/scenes/{name}.zip, unzip it, and pass the directory that "
          f"holds data.mdb.")


class LsunSource:
  """An LSUN LMDB export as a random-access source of `{'image': uint8 [S, S, 3], 'label': 0}`.

  `image_size=None` returns the decoded images uncropped. Picklable (it holds the path and the
  key list; the LMDB environment is opened per process), so it works with grain's workers.
  """

  def __init__(self, lmdb_path: str | os.PathLike, *, image_size: int | None = 256,
               small_images: str = "error", keys_file: str | os.PathLike | None = None,
               max_images: int | None = None):
    self.lmdb_path = os.fspath(lmdb_path)
    if not epath.Path(self.lmdb_path).exists():
      raise DatasetNotFoundError(missing_lsun_message(self.lmdb_path))
    if small_images not in SMALL_IMAGE_POLICIES:
      raise ValueError(f"small_images must be one of {SMALL_IMAGE_POLICIES}, not "
                       f"{small_images!r}")
    if small_images == "skip" and image_size is None:
      raise ValueError("small_images='skip' needs an image_size")
    self.image_size = None if image_size is None else int(image_size)
    self.small_images = small_images
    self.num_skipped = 0
    keys_file = os.fspath(keys_file) if keys_file else None
    if keys_file and epath.Path(keys_file).exists():
      keys = self._read_keys_file(keys_file)
    else:
      keys = self._scan_keys()
      if keys_file:
        self._write_keys_file(keys_file, keys)
    if max_images is not None:
      keys = keys[:int(max_images)]
    if not keys:
      raise ValueError(f"LSUN LMDB {self.lmdb_path!r} holds no usable images")
    self._keys = keys

  # -- LMDB access -----------------------------------------------------------------------------

  def _open(self) -> Any:
    return _environment(self.lmdb_path)

  def _scan_keys(self) -> list[bytes]:
    keys = []
    with self._open().begin(write=False) as txn:
      if self.small_images == "skip":
        for key, value in txn.cursor():
          with Image.open(io.BytesIO(value)) as img:  # reads the header only
            if min(img.size) >= self.image_size:
              keys.append(bytes(key))
            else:
              self.num_skipped += 1
      else:
        keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
    return keys

  def _keys_file_header(self) -> str:
    return f"# lsun keys of {os.path.abspath(self.lmdb_path)}; small_images={self.small_images}" \
           f"; image_size={self.image_size}"

  def _read_keys_file(self, path: str) -> list[bytes]:
    with epath.Path(path).open() as f:
      header = f.readline().rstrip("\n")
      if header != self._keys_file_header():
        raise ValueError(f"keys file {path!r} was written for another export or settings "
                         f"({header!r}); delete it to list the keys again")
      return [bytes.fromhex(line.strip()) for line in f if line.strip()]

  def _write_keys_file(self, path: str, keys: list[bytes]) -> None:
    with file_io.atomic_open(path) as f:
      f.write(self._keys_file_header() + "\n")
      f.writelines(k.hex() + "\n" for k in keys)

  # -- Records ---------------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self._keys)

  def key(self, index: int) -> bytes:
    return self._keys[int(index)]

  def __getitem__(self, index: int) -> dict[str, Any]:
    key = self._keys[int(index)]
    with self._open().begin(write=False) as txn:
      value = txn.get(key)
    if value is None:
      raise KeyError(f"LSUN LMDB {self.lmdb_path!r} has no key {key!r} (listed earlier: was the "
                     f"keys file written for another export?)")
    try:
      with Image.open(io.BytesIO(value)) as img:
        image = np.asarray(img.convert("RGB"))
    except Exception as e:
      raise ValueError(f"LSUN image {key!r} in {self.lmdb_path!r} cannot be decoded: {e}") from e
    if self.image_size is not None:
      if min(image.shape[:2]) < self.image_size:
        raise ImageTooSmallError(
            f"LSUN image {key!r} (index {index}) is {image.shape[1]}×{image.shape[0]}, smaller "
            f"than the {self.image_size}×{self.image_size} crop; use small_images='skip' to drop "
            f"such images, or a smaller image_size")
      image = center_crop_resize(image, self.image_size)
    return {"image": np.ascontiguousarray(image), "label": 0}

  def __repr__(self) -> str:
    return f"LsunSource({self.lmdb_path!r}, {len(self)} images, image_size={self.image_size})"
