"""A run's workdir before any compilation: every input check (`prepare`) and its `config.json`.

Shared by the training loop, `restore.restore_latest` (sample, inpaint and eval) and the tests.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from absl import logging
from etils import epath

from asyncpatch_jax import file_io
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import validation


def write_config(config: Any, workdir: epath.Path) -> None:
  """`config.json` in the workdir (process 0 only), so every run documents itself."""
  if jax.process_index() == 0:
    file_io.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))


def prepare(config: Any, workdir: str | epath.Path) -> tuple[epath.Path, Any, Any]:
  """Every check that can fail on bad input, before any compilation. Returns (workdir, mesh,
  batch sharding)."""
  validation.validate_config(config)
  data, fsdp = validation.validate_topology(config)
  workdir = validation.check_workdir(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("%s, %d process(es)", validation.describe_mesh(data, fsdp), jax.process_count())
  return workdir, mesh, mesh_lib.batch_sharding(mesh)
