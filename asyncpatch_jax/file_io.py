"""Files that a reader never sees half-written: write a hidden sibling, then rename it into place.

Every output of the package goes through here (JSON results, PNG grids, FID statistics, ADM
batches, weights, sample folders, latent-cache metadata). Paths are local paths or `etils.epath`
URLs; where the store has no atomic rename (an object store), epath's rename is a copy and a
delete, which still never leaves a partial file under the final name. A failed write removes its
temporary and leaves what was there before untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike


def _hidden_sibling(path: epath.Path) -> epath.Path:
  return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[epath.Path]:
  """Yields a temporary path beside `path` for a library that writes by name (PIL, safetensors,
  zip); on success it is renamed to `path`, on any error removed."""
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
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
  """`open(path, mode)` ('w' or 'wb') whose contents appear under `path` only once complete."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
  with atomic_path(path) as tmp, tmp.open(mode) as f:
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
