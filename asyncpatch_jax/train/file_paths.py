"""Every path a run reads or writes, made absolute once, at start-up.

Orbax refuses relative checkpoint paths, and a relative path read later (a TensorBoard writer,
a sampling output folder, a background save) must not depend on the current directory of the
moment. `main.py` calls `resolve` before anything else touches the file system; `--workdir`
resolved here is the one every later step uses. URLs (`gs://…`, any `scheme://`) are left as
they are, and so are values that name something other than a file (`vae.weights='random'`, a
mask name such as `sampling.mask='half'`).
"""

from __future__ import annotations

import os
from typing import Any

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
