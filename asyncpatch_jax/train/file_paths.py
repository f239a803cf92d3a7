"""Every path a run reads or writes, made absolute once, at start-up.

Orbax refuses relative checkpoint paths, and a relative path read later (a TensorBoard writer,
a sampling output folder, a background save) must not depend on the current directory of the
moment. `main.py` calls `resolve` before anything else touches the file system; `--workdir`
resolved here is the one every later step uses. URLs (`gs://…`, any `scheme://`) are left as
they are, and so are values that name something other than a file (`vae.weights='random'`, a
mask name such as `sampling.mask='half'`).

`check_urls` then checks every bucket path (`gs://…`) once, before anything compiles: a bucket
that does not exist, missing credentials or an input folder that is not there fail at once with
the path and the fix, not after minutes of compilation on every host.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from etils import epath

from asyncpatch_jax import file_io
from asyncpatch_jax.sampling import masks as masks_lib

# Config fields that hold a file or folder path (a dotted name into the config), with the
# values of each that are names rather than paths. A field the config lacks is an error.
PATH_FIELDS: dict[str, frozenset[str]] = {
    "init_from": frozenset(),                # a DiT checkpoint (models/dit_weights.py)
    "data.latent_dir": frozenset(),
    "data.lsun_dir": frozenset(),
    "data.tfds_data_dir": frozenset(),
    "eval.fid_cache_dir": frozenset(),
    "eval.fid_reference": frozenset(),       # an ADM reference batch (evaluation/adm.py)
    "eval.compare_workdir": frozenset(),     # a second run's workdir (paired bits/dim)
    "vae.weights": frozenset({"random"}),
    "sampling.output_dir": frozenset(),
    "sampling.image": frozenset(),           # a file, a folder or a glob
    "sampling.mask": frozenset(masks_lib.MASKS),
}


def absolute(path: str) -> str:
  """`path` made absolute against the current directory (with `~` expanded); '' and URLs as
  they are (a glob stays a glob)."""
  path = str(path)
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _field(config: Any, dotted: str) -> tuple[Any, str]:
  *parents, key = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  return node, key


def resolve(config: Any, workdir: str) -> tuple[Any, str, dict[str, tuple[str, str]]]:
  """Makes `workdir` and every `PATH_FIELDS` value of `config` absolute, in place.

  Returns `(config, workdir, changed)`, where `changed` maps each rewritten name
  (`--workdir`, `sampling.image`, …) to its `(given, resolved)` pair, for the log.
  """
  changed: dict[str, tuple[str, str]] = {}
  resolved_workdir = absolute(workdir)
  if resolved_workdir != str(workdir):
    changed["--workdir"] = (str(workdir), resolved_workdir)
  for dotted, names in PATH_FIELDS.items():
    try:
      node, key = _field(config, dotted)
      value = node[key]
    except (KeyError, AttributeError) as e:
      raise KeyError(f"file_paths.PATH_FIELDS names {dotted!r}, which the config lacks; "
                     f"update the table in asyncpatch_jax/train/file_paths.py") from e
    if not isinstance(value, str) or value in names:
      continue
    new = absolute(value)
    if new != value:
      node[key] = new
      changed[dotted] = (value, new)
  return config, resolved_workdir, changed


# Bucket fields that a run only reads, so they must exist at start-up. The others are written
# (the workdir, outputs, caches) or have their own recipe when missing (`data.latent_dir` and
# `vae.weights`: `data.preparation`); for those only the bucket itself is checked.
URL_INPUTS = ("init_from", "data.lsun_dir", "data.tfds_data_dir", "eval.fid_reference",
              "eval.compare_workdir", "sampling.image")
URL_CHECK_TIMEOUT_S = 120.0


class BucketPathError(FileNotFoundError):
  """A bucket path that cannot be used: no such bucket or folder, or no access to it."""


def _credentials_fix(url: str) -> str:
  bucket = "/".join(url.split("/")[:3])
  return (f"give this machine access to {bucket}: `gcloud auth application-default login` on a "
          f"workstation; on a TPU VM or GCE host, a service account with the Storage Object "
          f"Admin role on the bucket (`gcloud storage buckets add-iam-policy-binding {bucket} "
          f"--member=serviceAccount:SA --role=roles/storage.objectAdmin`)")


def _url_problem(name: str, url: str, must_exist: bool) -> str | None:
  """What is wrong with bucket path `url` (config field `name`), with the fix; None if usable."""
  bucket = "/".join(url.split("/")[:3])
  try:
    if not epath.Path(bucket).exists():
      return (f"{name}={url}: bucket {bucket} does not exist (or this machine may not list it). "
              f"Fix the path, or create the bucket (`gcloud storage buckets create {bucket} "
              f"--location=REGION`, the TPUs' region); if it exists, {_credentials_fix(url)}")
    target = epath.Path(url.split("*")[0]).parent if "*" in url else epath.Path(url)
    if must_exist and not target.exists():
      return (f"{name}={url} does not exist. Copy the files there first (`gcloud storage cp -r "
              f"LOCAL {url}`) or fix the path")
  except Exception as e:  # the backends raise their own types for auth and network failures
    return (f"{name}={url}: cannot read it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). {_credentials_fix(url)}")
  return None


def check_urls(config: Any, workdir: str, *, timeout_s: float = URL_CHECK_TIMEOUT_S) -> None:
  """Raises `BucketPathError` naming every unusable bucket path of the run (`--workdir` and
  `PATH_FIELDS`) and how to fix it; local paths are left to the steps that read them."""
  urls = [("--workdir", str(workdir), False)]
  for dotted in PATH_FIELDS:
    node, key = _field(config, dotted)
    value = node[key]
    if isinstance(value, str) and file_io.is_url(value):
      urls.append((dotted, value, dotted in URL_INPUTS))
  urls = [u for u in urls if file_io.is_url(u[1])]
  if not urls:
    return
  # A host without network access or credentials can wait minutes in the storage client's
  # retries: bound the whole check (daemon threads, so a hung one does not hold up the exit).
  results: dict[int, str | None] = {}
  threads = [threading.Thread(target=lambda i=i, u=u: results.update({i: _url_problem(*u)}),
                              daemon=True) for i, u in enumerate(urls)]
  deadline = time.monotonic() + timeout_s
  for t in threads:
    t.start()
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  problems = [results[i] if i in results else
              f"{name}={url}: no answer in {timeout_s:.0f} s (no network access to the bucket, "
              f"or the storage client is retrying without credentials). {_credentials_fix(url)}"
              for i, (name, url, _) in enumerate(urls)]
  problems = [p for p in problems if p]
  if problems:
    raise BucketPathError("bucket paths of this run cannot be used:\n  " + "\n  ".join(problems))
