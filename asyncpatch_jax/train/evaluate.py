"""Held-out evaluation: the training objective and (optionally) bits/dim, with EMA parameters.

The objective is evaluated with the training level sampler but a fixed key per batch, so numbers
from different steps are comparable. Bits/dim is the negative ELBO along the homogeneous path
(VDM's continuous-time bound) with the discretised 8-bit decoder, `eval.elbo_steps` strata.
`evaluate(config, workdir)` is `--mode=eval`: the latest checkpoint over the whole eval split.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import data as data_lib
from asyncpatch_jax import models
from asyncpatch_jax.diffusion import elbo, paths
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib


def ema_params_name(config: Any) -> str:
  """The EMA used for evaluation and samples: `sampling.ema`, or the first configured decay."""
  return config.sampling.ema or opt_lib.ema_name(config.optimizer.ema_decays[0])


class Evaluator:
  """Mean held-out loss (and bits/dim) over `num_batches` global batches of the eval split."""

  def __init__(self, config: Any, setup: state_lib.StateSetup, batch_sharding: NamedSharding,
               num_batches: int | None = None):
    self.config, self.setup, self.batch_sharding = config, setup, batch_sharding
    self.num_batches = int(config.eval.num_batches) if num_batches is None else num_batches
    # Open the split now, so a missing or too small eval split fails before any compilation.
    self._source = data_lib.get_source(config.data, config.data.eval_split)
    if len(self._source) < int(config.data.batch_size):
      raise ValueError(f"the eval split {config.data.eval_split!r} has {len(self._source)} "
                       f"records, fewer than one global batch ({config.data.batch_size})")
    loss_fn = step_lib.make_loss_fn(config, setup.model_def, train=False)
    schedule = state_lib.make_schedule(config.diffusion)
    patch = int(config.diffusion.patch_size)
    elbo_steps = int(config.eval.elbo_steps)
    num_classes = int(config.model.num_classes)
    root = jax.random.fold_in(jax.random.key(int(config.seed)), 0xE7A1)

    def eval_step(params, model_state, batch, index):
      key = jax.random.fold_in(root, index)
      _, (aux, _) = loss_fn(params, model_state, batch, key)
      out = {"loss": aux["loss"], "mse": aux["mse"], "nll": aux["nll"]}
      if elbo_steps > 0:
        model = setup.model_def.merge(params, model_state)
        labels = batch["label"].astype(jnp.int32) if num_classes else None
        denoiser = models.make_denoiser(
            model, schedule=schedule, parametrization=config.model.parametrization,
            patch_size=patch, labels=labels, num_classes=num_classes)
        x0 = data_lib.to_model_range(batch["image"])
        bound = elbo.nelbo(denoiser, x0, jax.random.fold_in(key, 1), schedule=schedule,
                           path=paths.homogeneous(), num_steps=elbo_steps, patch_size=patch,
                           data="discrete8bit")
        out["bpd"] = bound["bpd"].mean()
      return out

    replicated = NamedSharding(setup.mesh, P())
    self._step = jax.jit(eval_step, in_shardings=(setup.shardings.params,
                                                  setup.shardings.model_state, batch_sharding,
                                                  replicated),
                         out_shardings=replicated)

  def __call__(self, state: state_lib.TrainState) -> dict[str, float]:
    params = state.ema[ema_params_name(self.config)]
    pipeline = data_lib.create_eval_pipeline(self.config.data, self.batch_sharding,
                                             max_batches=self.num_batches or None,
                                             source=self._source)
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(pipeline):
      if pipeline.num_batches is not None and index >= pipeline.num_batches:
        break
      out = self._step(params, state.model_state, batch, jnp.int32(index))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
      count += 1
    return {f"eval/{k}": v / max(count, 1) for k, v in totals.items()}


def evaluate(config: Any, workdir: str | epath.Path) -> dict[str, float]:
  """`--mode=eval`: the latest checkpoint's EMA over the whole eval split; writes JSON."""
  from asyncpatch_jax.train import trainer  # the shared preparation; avoids an import cycle

  workdir, batch_sharding, setup, state, step = trainer.restore_latest(config, workdir)
  results = Evaluator(config, setup, batch_sharding, num_batches=0)(state)
  results["step"] = step
  logging.info("Evaluation at step %d: %s", step, results)
  if jax.process_index() == 0:
    (workdir / f"eval_step_{step}.json").write_text(json.dumps(results, indent=2))
  return results
