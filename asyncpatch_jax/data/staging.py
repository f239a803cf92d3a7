"""Local copies of bucket data for readers that open local files only (ArrayRecord, LMDB).

array_record's reader opens files by name with its own C++ I/O: the installed 0.8 wheel also
links a GCS client for `gs://`, but each random-access record is then a ranged GET of ~32 KB
with its own round trip, untested here, and no other scheme (nor TensorFlow's, nor fsspec's
filesystems) is readable at all; py-lmdb reads local files only. So a run whose latent cache or
LSUN export is a URL copies it once to local disk on every host (each host draws examples from
every shard, so each needs the whole cache) and reads the copy:

    gs://BUCKET/latents/imagenet256/train/latents-00000-of-00126.array_record
      → $ASYNCPATCH_STAGING_DIR/gs/BUCKET/latents/imagenet256/train/latents-00000-…

`ASYNCPATCH_STAGING_DIR` defaults to `~/.cache/asyncpatch_jax/staging` (the boot disk of a TPU
VM); point it at a local disk where home directories are shared (NFS on a GPU cluster). A file
is copied under a hidden name and renamed when complete (`file_io.copy_file`), and one already
there with the bucket's size is kept, so a pre-empted or restarted worker copies only what it
lacks, and processes sharing a host may stage the same folder at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent import futures

from absl import logging
from etils import epath

from asyncpatch_jax import file_io

STAGING_ENV = "ASYNCPATCH_STAGING_DIR"
DEFAULT_STAGING_DIR = "~/.cache/asyncpatch_jax/staging"


def staging_root() -> epath.Path:
  """Where local copies go: `$ASYNCPATCH_STAGING_DIR`, else `~/.cache/asyncpatch_jax/staging`."""
  return epath.Path(os.environ.get(STAGING_ENV) or DEFAULT_STAGING_DIR).expanduser()


def local_dir(url: str) -> epath.Path:
  """The local folder that mirrors folder `url`: `<staging root>/<scheme>/<bucket>/<path>`."""
  scheme, _, rest = os.fspath(url).partition("://")
  return staging_root() / scheme / rest.strip("/")


def _stage_file(src: epath.Path, dst: epath.Path) -> int:
  """Copies `src` to `dst` unless `dst` has its size already; the bytes copied."""
  size = src.stat().length
  if dst.exists() and dst.stat().length == size:
    return 0
  file_io.copy_file(src, dst)
  return size


def stage(folder: str | os.PathLike, names: Sequence[str] | None = None, *,
          num_threads: int = 16, log: Callable[[str], None] | None = logging.info) -> str:
  """The local folder holding files `names` (default: all files) of `folder`.

  A local `folder` is returned as it is. For a URL, the files are copied `num_threads` at a
  time into `local_dir(folder)`, skipping those already there with the same size.
  """
  if not file_io.is_url(folder):
    return os.fspath(folder)
  remote = epath.Path(folder)
  if names is None:
    names = sorted(p.name for p in remote.iterdir() if not p.is_dir())
  target = local_dir(os.fspath(folder))
  target.mkdir(parents=True, exist_ok=True)
  with futures.ThreadPoolExecutor(max(1, min(num_threads, len(names)))) as pool:
    copied = sum(pool.map(lambda name: _stage_file(remote / name, target / name), names))
  if log and copied:
    log(f"staged {copied / 2**30:.2f} GiB of {folder} to {target}")
  return os.fspath(target)
