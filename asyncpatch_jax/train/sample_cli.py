"""`--mode=sample`: grids (PNG) and raw arrays (.npz) from the latest checkpoint's EMA.

Uses `config.sampling` (strategy, steps, stochastic, cfg_scale, input guidance, inpainting mask,
which EMA), so any of them can be changed on the command line without retraining, e.g.
`--config.sampling.num_steps=50 --config.sampling.stochastic=False`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from asyncpatch_jax.train import samples as samples_lib


def sample_from_checkpoint(config: Any, workdir: str | epath.Path) -> dict[str, np.ndarray]:
  """Writes `<workdir>/samples/{samples,inpaint}_<step>.png` and `arrays_<step>.npz`."""
  from asyncpatch_jax.train import trainer  # shared checks and mesh; avoids an import cycle

  workdir, _, setup, state, step = trainer.restore_latest(config, workdir)
  out_dir = workdir / "samples"
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
  arrays = samples_lib.SampleWriter(config, setup, out_dir, metric_writers.LoggingWriter())(
      state, step)
  if jax.process_index() == 0:
    with (out_dir / f"arrays_{step:08d}.npz").open("wb") as f:
      np.savez(f, **arrays)
  logging.info("Sampled step %d (strategy %s, %d steps) into %s", step,
               config.sampling.strategy, config.sampling.num_steps, out_dir)
  return arrays
