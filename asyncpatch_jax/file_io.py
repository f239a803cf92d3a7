"""Files that a reader never sees half-written: write a hidden sibling, then rename it into place.

Every output of the package goes through here (JSON results, PNG grids, FID statistics, ADM
batches, weights, sample folders, latent-cache metadata). Paths are local paths or `etils.epath`
URLs; where the store has no atomic rename (an object store), epath's rename is a copy and a
delete, which still never leaves a partial file under the final name. A failed write removes its
temporary and leaves what was there before untouched. Libraries that read or write only local
files by name (safetensors, ArrayRecord, LMDB) get a local stand-in for a URL: `atomic_path`
yields a local temporary that is uploaded on success, `local_file` a temporary download.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike

_COPY_CHUNK = 2**24  # bytes per read when copying between file systems


def is_url(path: PathLike) -> bool:
  """Whether `path` names a file on a remote store (`gs://…`, any `scheme://`), not on disk."""
  return "://" in os.fspath(path)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies `src` to `dst` (either local or a URL), atomically: `dst` appears only complete."""
  with epath.Path(src).open("rb") as fin, atomic_open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, _COPY_CHUNK)


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
  """A local file name with the contents of `path`, for a library that reads local files by name
  only: `path` itself when it is local, else a temporary download removed when the block ends."""
  if not is_url(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="asyncpatch-download-") as folder:
    local = epath.Path(folder) / epath.Path(path).name
    copy_file(path, local)
    yield os.fspath(local)


def _hidden_sibling(path: epath.Path) -> epath.Path:
  return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _hidden_temporary(path: PathLike) -> Iterator[epath.Path]:
  """A hidden sibling of `path` (on the same store), renamed to `path` on success."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _hidden_sibling(path)
  try:
    yield tmp
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[epath.Path]:
  """Yields a temporary path beside `path` for a library that writes by name (PIL, safetensors,
  zip, ArrayRecord); on success it is renamed to `path`, on any error removed. For a URL the
  temporary is a local file (those libraries write local files only), uploaded on success."""
  if not is_url(path):
    with _hidden_temporary(path) as tmp:
      yield tmp
    return
  with tempfile.TemporaryDirectory(prefix="asyncpatch-upload-") as folder:
    local = epath.Path(folder) / epath.Path(path).name
    yield local
    copy_file(local, path)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
  """`open(path, mode)` ('w' or 'wb') whose contents appear under `path` only once complete."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
  with _hidden_temporary(path) as tmp, tmp.open(mode) as f:
    yield f


def write_text(path: PathLike, text: str) -> None:
  """`text` under `path`, atomically."""
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: PathLike, data: Any) -> None:
  """`data` as indented JSON with sorted keys, atomically."""
  with atomic_open(path) as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[epath.Path]:
  """Yields a hidden folder beside `path` to fill; renamed to `path` when the block ends without
  error (so `path` must not exist yet), removed with its contents otherwise."""
  path = epath.Path(path)
  if path.exists():
    raise FileExistsError(f"{path} exists already; choose a new output folder")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _hidden_sibling(path)
  tmp.mkdir()
  try:
    yield tmp
    tmp.rename(path)
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise
