"""Orbax checkpoints behind one small class: the train state, the grain iterator and the config.

Each checkpoint step directory holds three items: `state` (parameters, optimizer, EMAs, step;
restored onto an abstract target that carries the shardings, so nothing is materialised on one
device and a different topology reshards on load), `data` (the grain iterator state, one file per
process) and `config` (JSON). Saves are asynchronous and atomic: orbax writes to a temporary
directory and renames it when every item is committed, so an interrupted save leaves no
checkpoint that `latest_step` would pick up. Keeps the last `max_to_keep` checkpoints plus every
`keep_period`-th step.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class _IteratorSnapshot:
  """The iterator's state captured at save time, so an async save can't see it advance."""

  def __init__(self, iterator: Any):
    self._state = json.dumps(iterator.get_state(), indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves and restores `TrainState` + data iterator + config under `<workdir>/checkpoints`."""

  def __init__(self, directory: str | epath.Path, checkpoint_config: Any, *,
               read_only: bool = False):
    self.directory = epath.Path(directory)
    keep_period = int(checkpoint_config.keep_period) or None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(checkpoint_config.max_to_keep) or None,
        keep_period=keep_period,
        enable_async_checkpointing=bool(checkpoint_config.async_save),
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None, config: Any, *,
           force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (and the iterator position) at `step`."""
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Checkpoint save started at step %d in %s", step, self.directory)
    return saved

  def restore(self, step: int | None, abstract_state: Any,
              data_iterator: Any | None = None) -> Any:
    """The state at `step` (default: latest), placed as `abstract_state`'s shardings say.

    If `data_iterator` is given, it is moved to the saved position in place.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint step %d from %s", step, self.directory)
    return restored["state"]

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else int(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Turns SIGTERM into a flag the train loop polls, so it can save and exit cleanly.

  With several processes every host must agree on the stopping step: it then relies on JAX's
  preemption sync point (the coordination service forwards the notice to all hosts).
  """

  def __init__(self, manager: ocp.CheckpointManager | None = None):
    self._flag = threading.Event()
    self._manager = manager
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint and exit after this step")
    self._flag.set()

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1 and self._manager is not None:
      return bool(self._manager.reached_preemption(int(step)))
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
