"""`train_and_evaluate(config, workdir)`: the training loop that `main.py --mode=train` runs.

Order of events: every check of the config, devices, workdir and data set (cheap, clear errors);
then the abstract state and its shardings; restore the latest checkpoint (state and data
position) or initialise in place; then the loop. The loop never blocks on the device except at
log, checkpoint, sampling and evaluation steps, where it also verifies that no loss or gradient
since the previous check was non-finite — so a saved checkpoint is always a good one.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from asyncpatch_jax import data as data_lib
from asyncpatch_jax.models import dit_weights
from asyncpatch_jax.train import checkpoint as ckpt_lib
from asyncpatch_jax.train import eval_job, perf
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import samples as samples_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib
from asyncpatch_jax.train import workdir as workdir_lib


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN / inf; the message names the step."""


def _check_finite(acc: step_lib.TrainMetrics | None, checkpointer: ckpt_lib.Checkpointer,
                  skipped_before: int = 0, max_skips: int = 0) -> None:
  """Raises `NonFiniteError` at a non-finite step, or (with `max_skips` > 0, i.e.
  `optimizer.skip_nonfinite_updates`) once more than `max_skips` steps were skipped."""
  if acc is None:
    return
  first = int(acc.first_nonfinite_step.compute())
  if first != step_lib.NO_FAILURE:
    what = f"non-finite loss or gradient at step {first}"
    if max_skips > 0:
      total = skipped_before + int(acc.nonfinite_steps.compute())
      if total <= max_skips:
        return  # those updates were skipped in the step
      what = (f"{total} steps skipped for a non-finite loss or gradient (the latest ones from "
              f"step {first}), more than optimizer.skip_nonfinite_updates={max_skips}")
    checkpointer.wait_until_finished()  # let an in-flight (verified) save complete
    raise NonFiniteError(
        f"{what}; stopping. The last good checkpoint is "
        f"step {checkpointer.latest_step()} in {checkpointer.directory} (lower the learning "
        f"rate, enable gradient clipping, or check the data)")


def _write_metrics(writer: metric_writers.MetricWriter, step: int,
                   acc: step_lib.TrainMetrics) -> dict[str, float]:
  computed = acc.compute()
  scalars = {f"train/{k}": float(np.asarray(v)) for k, v in computed.items()
             if k != "first_nonfinite_step"}
  writer.write_scalars(step, scalars)
  return scalars


class _Clock:
  """The wall-clock budget (`train_minutes`), agreed by all processes when there are several."""

  def __init__(self, minutes: float):
    self.budget = 60.0 * float(minutes)
    self.start = time.monotonic()

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def out_of_time(self, sync: bool) -> bool:
    if self.budget <= 0:
      return False
    local = self.elapsed() >= self.budget
    if jax.process_count() == 1:
      return local
    if not sync:
      return False
    return bool(multihost_utils.broadcast_one_to_all(np.int32(local)))


def start_from_dit(config: Any, setup: state_lib.StateSetup) -> state_lib.TrainState:
  """A fresh state whose parameters are the DiT checkpoint `config.init_from`: step 0, a fresh
  optimizer, EMAs equal to the weights. The file is read, mapped and checked against the network
  (models/dit_weights.py) before anything compiles."""
  model = setup.model_def.merge(setup.abstract.params, setup.abstract.model_state)
  params, notes = dit_weights.dit_params(dit_weights.read_checkpoint(config.init_from), model)
  for note in notes:
    logging.info("init_from: %s", note)
  params = jax.tree.map(lambda v, sharding: jax.make_array_from_callback(
      v.shape, sharding, lambda index: v[index]), params, setup.shardings.params)

  def start(state: state_lib.TrainState, params: Any) -> state_lib.TrainState:
    return state.replace(params=params, opt_state=setup.tx.init(params),
                         ema={name: jax.tree.map(jnp.copy, params) for name in state.ema})

  return jax.jit(start, donate_argnums=0, out_shardings=setup.shardings)(setup.init(config),
                                                                         params)


def train_and_evaluate(config: Any, workdir: str | epath.Path, *,
                       writer: metric_writers.MetricWriter | None = None
                       ) -> state_lib.TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

  Stops at `config.num_steps`, when `config.train_minutes` (if > 0) have passed, or on SIGTERM
  (after saving). Raises `NonFiniteError` on a NaN / inf loss or gradient without saving it.
  `writer` replaces the default CLU writer (TensorBoard + log on process 0), e.g. in notebooks.
  """
  workdir, mesh, batch_sharding = workdir_lib.prepare(config, workdir)
  train_data = data_lib.create_train_pipeline(config.data, batch_sharding)
  num_steps = int(config.num_steps)
  tx = opt_lib.make_optimizer(config.optimizer, num_steps)
  setup = state_lib.setup_state(config, mesh, tx)
  # These open the eval split and the inpainting references: errors before any compilation.
  samples = samples_lib.SampleWriter(config, setup, workdir)
  evaluator = (eval_job.Evaluator(config, setup, batch_sharding)
               if config.eval.every_steps > 0 else None)

  # Every check passed: from here on the workdir gets written.
  workdir_lib.write_config(config, workdir)
  if writer is None:
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
  samples.writer = writer

  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
  latest = checkpointer.latest_step()
  if latest is not None:
    # The newest checkpoint that restores; damaged newer ones are skipped and moved aside.
    state = checkpointer.restore(None, setup.abstract, train_data.iterator)
  elif config.get("init_from"):
    state = start_from_dit(config, setup)
  else:
    state = setup.init(config)
  initial_step = int(state.step)
  logging.info("Starting at step %d of %d (%s)", initial_step, num_steps,
               "resumed" if latest is not None else
               f"from DiT weights {config.init_from}" if config.get("init_from") else "fresh")

  if initial_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, int | float | str | bool)})
  if config.logging.parameter_overview:
    parameter_overview.log_parameter_overview(
        state.params.to_pure_dict(), include_stats=jax.process_count() == 1,
        msg=f"parameters ({state_lib.num_params(state.params):,})", jax_logging_process=0)
  specs = state_lib.describe_shardings(setup.shardings)
  sharded = {k: v for k, v in specs.items() if v != "P()"}
  logging.info("%d of %d parameter arrays sharded over fsdp%s", len(sharded), len(specs),
               f": {sharded}" if len(sharded) <= 20 else "")

  train_step = step_lib.jit_train_step(step_lib.make_train_step(config, setup), setup,
                                       batch_sharding)
  # FLOPs per step logged once after the first step; images/s and MFU at every log step.
  throughput = perf.StepThroughput(
      config, setup.model_def.merge(setup.abstract.params, setup.abstract.model_state))

  hooks = []
  report = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.logging.log_every_steps,
      every_secs=None)
  if jax.process_index() == 0:
    hooks.append(report)
    if config.logging.profile:
      hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5))

  preemption = ckpt_lib.PreemptionWatcher(checkpointer.manager)
  clock = _Clock(config.train_minutes)
  log_every = int(config.logging.log_every_steps)
  ckpt_every = int(config.checkpoint.every_steps)
  sample_every = int(config.sampling.every_steps)
  eval_every = int(config.eval.every_steps)
  acc = None
  skipped, max_skips = 0, int(config.optimizer.skip_nonfinite_updates)
  step = initial_step
  try:
    with metric_writers.ensure_flushes(writer):
      while step < num_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = next(train_data)
          state, step_metrics = train_step(state, batch)
        step += 1
        acc = step_metrics if acc is None else acc.merge(step_metrics)
        if step == initial_step + 1:
          logging.info("%s", throughput.start(train_step, state, batch, step, time.monotonic()))
        for hook in hooks:
          hook(step)
        at_log = step % log_every == 0
        preempted = preemption.reached(step)
        out_of_time = clock.out_of_time(sync=at_log)
        stop = preempted or out_of_time
        last = step == num_steps or stop
        if at_log or last:
          _check_finite(acc, checkpointer, skipped, max_skips)
          _write_metrics(writer, step, acc)
          if newly_skipped := int(acc.nonfinite_steps.compute()):
            skipped += newly_skipped
            logging.warning("Skipped %d update(s) with a non-finite loss or gradient up to step "
                            "%d (%d of %d allowed since the start)", newly_skipped, step, skipped,
                            max_skips)
          if perf_scalars := throughput.report(step, time.monotonic()):
            writer.write_scalars(step, perf_scalars)
          acc = None
        if step % ckpt_every == 0 or last:
          _check_finite(acc, checkpointer, skipped, max_skips)
          checkpointer.save(step, state, train_data.iterator, config)
        if eval_every and step % eval_every == 0 and evaluator is not None:
          with report.timed("eval"):
            writer.write_scalars(step, evaluator(state))
        if sample_every and step % sample_every == 0 and not last:
          with report.timed("sample"):
            samples(state, step)
        if preempted:
          logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved, exiting", step)
          return state
        if out_of_time:
          logging.info("Time budget of %.1f min reached at step %d", clock.budget / 60, step)
          break
      if step > initial_step or latest is None:
        with report.timed("sample"):
          samples(state, step)
      logging.info("Finished at step %d after %.1f s of training", step, clock.elapsed())
  finally:
    preemption.close()
    checkpointer.close()
    train_data.close()
    writer.flush()
  return state


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out

