"""Orbax checkpoints behind one small class: the train state, the grain iterator and the config.

Each checkpoint step directory holds four items: `state` (parameters, optimizer, EMAs, step;
restored onto an abstract target that carries the shardings, so nothing is materialised on one
device and a different topology reshards on load), `data` (the grain iterator state, one file per
process), `config` (JSON) and `integrity` (a position-weighted checksum of every state array,
recomputed after a restore: a flipped byte that the storage format decodes without error would
otherwise come back as silently wrong parameters). Saves are asynchronous and atomic: orbax
writes to a temporary directory and renames it when every item is committed, so an interrupted
save (even SIGKILL) leaves no checkpoint that `latest_step` would pick up. Keeps the last
`max_to_keep` checkpoints plus every `keep_period`-th step.

A checkpoint that exists but does not restore (a truncated array file, a missing item, garbage
metadata: disk faults, a copy cut short) is skipped with a warning naming its step and error, and
the previous step is tried; once an older step restores, the damaged newer ones are moved aside
to `<step>.corrupt` (process 0), so the run continues from the last good state instead of
crash-looping. If no step restores, nothing is moved and `CheckpointError` lists every failure
(then a changed config, not damage, is the likely cause).
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none restores; the message lists each step's error."""


def _as_uint32(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize == 8:  # [..., 2] halves
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(
      jnp.uint32)


@jax.jit
def _fingerprints(tree: Any) -> Any:
  """Per array: Σ_i bits_i · (2i + 1) mod 2³², which changes whenever any one element's bits
  change (odd weights are invertible mod 2³²), independent of how the array is sharded."""
  def one(x):
    u = _as_uint32(jnp.asarray(x))
    index, stride = jnp.zeros(u.shape, jnp.uint32), 1  # row-major position, without a reshape
    for axis in reversed(range(u.ndim)):                # (which could regather a sharded array)
      index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride)
      stride = stride * u.shape[axis] % 2**32
    return jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def state_fingerprint(state: Any) -> dict[str, int]:
  """`{leaf path: checksum}` of a pytree of arrays (see `_fingerprints`)."""
  sums = jax.device_get(_fingerprints(state))
  return {jax.tree_util.keystr(path): int(v)
          for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


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
    self.read_only = read_only
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
            "integrity": ocp.JsonCheckpointHandler(),
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
        "integrity": ocp.args.JsonSave({"state_fingerprint": state_fingerprint(state)}),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Checkpoint save started at step %d in %s", step, self.directory)
    return saved

  def restore(self, step: int | None, abstract_state: Any,
              data_iterator: Any | None = None) -> Any:
    """The state at `step` (default: the latest that restores), placed as `abstract_state`'s
    shardings say.

    If `data_iterator` is given, it is moved to the saved position in place.
    """
    if step is None:
      return self.restore_latest_good(abstract_state, data_iterator)[0]
    return self._restore_step(int(step), abstract_state, data_iterator)

  def restore_latest_good(self, abstract_state: Any, data_iterator: Any | None = None
                          ) -> tuple[Any, int]:
    """`(state, step)` of the newest checkpoint that restores; damaged newer ones are skipped
    with a warning and, once an older one restores, moved aside to `<step>.corrupt`."""
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed: list[tuple[int, str]] = []
    for step in steps:
      try:
        state = self._restore_step(step, abstract_state, data_iterator)
      except Exception as e:  # damage shows as OSError, ValueError, JSON errors, …
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        logging.warning("Checkpoint step %d in %s does not restore (%s); trying the previous "
                        "step", step, self.directory, error)
        failed.append((step, error))
        continue
      if failed:
        self._move_aside([s for s, _ in failed])
        logging.warning("Resumed from step %d: checkpoint step(s) %s did not restore and were "
                        "moved aside to <step>%s", step, [s for s, _ in failed], CORRUPT_SUFFIX)
      return state, step
    details = "; ".join(f"step {s}: {e}" for s, e in failed)
    raise CheckpointError(
        f"none of the {len(steps)} checkpoints in {self.directory} restores ({details}). If the "
        f"config changed since they were written (model, optimizer, EMAs), use the original "
        f"config or a new --workdir; if they are damaged, move them aside to start afresh")

  def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    checked = (self.directory / str(step) / "integrity").exists()
    if checked:
      items["integrity"] = ocp.args.JsonRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    restored = out["state"]
    if checked:
      want = out["integrity"]["state_fingerprint"]
      got = state_fingerprint(restored)
      bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
      if bad:
        raise ValueError(f"checksum mismatch in {len(bad)} state array(s), e.g. {bad[:3]}")
    else:
      logging.warning("Checkpoint step %d has no integrity item (written by an older version): "
                      "its arrays are not verified", step)
    saved_step = getattr(restored, "step", None)
    if saved_step is not None and int(saved_step) != step:
      raise ValueError(f"checkpoint directory {step} holds the state of step {int(saved_step)}")
    logging.info("Restored checkpoint step %d from %s", step, self.directory)
    return restored

  def _move_aside(self, steps: list[int]) -> None:
    """Renames damaged step directories to `<step>.corrupt` (process 0; read-only: no-op)."""
    if self.read_only:  # sample / eval never change the run's directory
      return
    if jax.process_index() == 0:
      for step in steps:
        path = self.directory / str(step)
        target = self.directory / f"{step}{CORRUPT_SUFFIX}"
        n = 1
        while target.exists():
          target, n = self.directory / f"{step}{CORRUPT_SUFFIX}{n}", n + 1
        path.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("asyncpatch_jax:checkpoints_moved_aside")
    self.manager.reload()

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
