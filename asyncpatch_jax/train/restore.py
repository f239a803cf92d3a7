"""A trained network back from its workdir: `restore_latest`, `restore_params`, `restore_model`.

A checkpoint holds the train state of one config. Reading it with another config either fails
deep inside Orbax (a parameter of another shape, another tree) or, worse, succeeds and means
something else (another parametrisation, schedule or patch size). `check_compatible` compares
the config saved with the checkpoint against the current one on the fields that fix the
parameters and their meaning (`MODEL_FIELDS`, less `FREE_FIELDS` and the section of the network
not used, e.g. `model.unet` for a DiT) and names every difference; everything else (sampling,
data pipeline, learning rate, batch size, …) may differ freely. A saved config with fields this
version lacks (a config of another layout, e.g. from before `model.unet` / `model.dit`) is
refused too, naming them. The sample, inpaint and eval jobs (and notebooks) restore through
here, read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from etils import epath
from flax import nnx

from asyncpatch_jax import models
from asyncpatch_jax.train import checkpoint as ckpt_lib
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import workdir as workdir_lib

# The parameters' shapes and meaning, and the train state's tree (EMAs, optimizer chain).
MODEL_FIELDS = ("model", "data.image_size", "data.channels", "diffusion.patch_size",
                "diffusion.schedule", "diffusion.log_snr_min", "diffusion.log_snr_max",
                "optimizer.name", "optimizer.ema_decays", "optimizer.grad_clip_norm")
# Model fields that change neither the parameters nor the function they compute.
FREE_FIELDS = ("model.unet.dropout", "model.label_dropout", "model.level_slots", "model.dtype",
               "model.attention_impl", "model.remat", "model.kernels")
RAW_PARAMS = "params"


def ema_params_name(config: Any) -> str:
  """The EMA used for evaluation and samples: `sampling.ema`, or the first configured decay."""
  return config.sampling.ema or opt_lib.ema_name(config.optimizer.ema_decays[0])


def _as_dict(config: Any) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _lookup(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
  node: Any = tree
  for part in dotted.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _normalise(field: str, value: Any) -> Any:
  if field == "optimizer.grad_clip_norm":  # only on / off changes the optimizer state's tree
    return bool(value and float(value) > 0)
  if isinstance(value, list | tuple):
    return tuple(_normalise(field, v) for v in value)
  if isinstance(value, int | float) and not isinstance(value, bool):
    return float(value)
  return value


def _leaves(value: Any, path: str) -> dict[str, Any]:
  if not isinstance(value, Mapping):
    return {path: value}
  out = {}
  for key, sub in value.items():
    out.update(_leaves(sub, f"{path}.{key}"))
  return out


def _compared(config: Mapping[str, Any]) -> dict[str, Any]:
  """The leaves under `MODEL_FIELDS` by dotted path, less `FREE_FIELDS`."""
  out = {}
  for field in MODEL_FIELDS:
    found, value = _lookup(config, field)
    if found:
      out.update(_leaves(value, field))
  return {k: v for k, v in out.items() if k not in FREE_FIELDS}


def _unused(fields: Mapping[str, Any]) -> set[str]:
  """The fields of the networks other than `model.name` (a DiT reads no `model.unet`)."""
  others = [f"model.{name}." for name in models.MODELS if name != fields.get("model.name")]
  return {k for k in fields if k.startswith(tuple(others))}


def unknown_fields(saved: Mapping[str, Any], config: Any) -> list[str]:
  """The model fields of the `saved` config that the current one lacks: the checkpoint was
  written by a version whose config had another layout."""
  return sorted(_compared(saved).keys() - _compared(_as_dict(config)).keys())


def config_differences(saved: Mapping[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, current value)} over `MODEL_FIELDS`; a field missing on either side
  (a checkpoint older than the field; see `unknown_fields` for the other way round), and the
  fields of the network not used on either side, are not compared."""
  old, new = _compared(saved), _compared(_as_dict(config))
  fields = (old.keys() & new.keys()) - _unused(old) - _unused(new)
  return {k: (old[k], new[k]) for k in sorted(fields)
          if _normalise(k, old[k]) != _normalise(k, new[k])}


class IncompatibleCheckpointError(ValueError):
  """A checkpoint was trained with a different model config; the message names the fields."""


def check_compatible(saved: Mapping[str, Any], config: Any, where: str) -> None:
  """Raises `IncompatibleCheckpointError` naming each model field where `config` differs from
  the `saved` one, or every field of `saved` that the current config lacks."""
  unknown = unknown_fields(saved, config)
  if unknown:
    raise IncompatibleCheckpointError(
        f"the checkpoint in {where} was written with a config of another layout: its fields "
        f"{', '.join(unknown)} do not exist in this version's config (the model config nests "
        f"the networks' own fields as model.unet.* and model.dit.*). Read it with the version "
        f"of asyncpatch_jax that wrote it, or train anew")
  diff = config_differences(saved, config)
  if diff:
    lines = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new)
                      in diff.items())
    overrides = " ".join(f"--config.{k}={old!r}" for k, (old, _) in list(diff.items())[:4])
    raise IncompatibleCheckpointError(
        f"the checkpoint in {where} was trained with a different model config ({lines}). "
        f"Use the config it was trained with (the run's config.json), e.g. {overrides}; "
        f"sampling settings may differ freely")


def restore_latest(config: Any, workdir: Any, step: int | None = None
                   ) -> tuple[epath.Path, Any, state_lib.StateSetup, state_lib.TrainState, int]:
  """The checks of `workdir.prepare`, then checkpoint `step` (None: the latest) restored onto the
  mesh (read-only), after checking that it was trained with this config's model
  (`check_compatible`).

  Returns `(workdir, batch_sharding, setup, state, step)`; shared by --mode=sample, inpaint and
  eval. A missing checkpoint, or a `step` that was not saved, is a FileNotFoundError that lists
  the saved steps; without `step`, damaged newer checkpoints are skipped with a warning.
  """
  directory = epath.Path(workdir) / "checkpoints"
  if not str(workdir) or not directory.exists():
    raise FileNotFoundError(f"no checkpoint in {directory}; train first (--mode=train) or pass "
                            f"the training run's --workdir")
  workdir, mesh, batch_sharding = workdir_lib.prepare(config, workdir)
  setup = state_lib.setup_state(config, mesh,
                                opt_lib.make_optimizer(config.optimizer, int(config.num_steps)))
  checkpointer = ckpt_lib.Checkpointer(directory, config.checkpoint, read_only=True)
  try:
    saved = checkpointer.all_steps()
    if not saved:
      raise FileNotFoundError(f"no checkpoint in {directory}; train first (--mode=train)")
    if step is None:
      # The newest checkpoint that restores: a damaged latest one is skipped with a warning (and
      # left where it is: read-only), as when training resumes.
      try:
        saved_config = checkpointer.restore_config(checkpointer.latest_step())
      except Exception:  # a damaged config item: the compatibility check uses the step restored
        saved_config = None
      if saved_config is not None:
        check_compatible(saved_config, config, str(directory))
      state, step = checkpointer.restore_latest_good(setup.abstract)
      if saved_config is None:
        check_compatible(checkpointer.restore_config(step), config, str(directory))
    else:
      if int(step) not in saved:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; the saved steps "
                                f"are {sorted(saved)}")
      step = int(step)
      check_compatible(checkpointer.restore_config(step), config, str(directory))
      state = checkpointer.restore(step, setup.abstract)
  finally:
    checkpointer.close()
  return workdir, batch_sharding, setup, state, step


class Restored(NamedTuple):
  """A checkpoint read for sampling: the parameters chosen by `ema` and what goes with them."""

  workdir: epath.Path
  setup: state_lib.StateSetup  # the model definition and the mesh
  params: nnx.State  # the EMA (or raw) parameters
  model_state: nnx.State
  step: int
  ema: str


def restore_params(config: Any, workdir: str | epath.Path, step: int | None = None,
                   ema: str | None = None) -> Restored:
  """Checkpoint `step` (None: the latest) of `workdir`, checked against `config`, with the
  parameters of `ema` (see `restore_model`)."""
  name = ema_params_name(config) if ema is None else ema
  names = opt_lib.ema_names(config.optimizer.ema_decays)  # the checkpoint's, once checked
  if name != RAW_PARAMS and name not in names:
    raise ValueError(f"no EMA {name!r} in the checkpoint; it has {list(names)} (or "
                     f"{RAW_PARAMS!r} for the raw parameters)")
  workdir, _, setup, state, step = restore_latest(config, workdir, step=step)
  params = state.params if name == RAW_PARAMS else state.ema[name]
  return Restored(workdir, setup, params, state.model_state, step, name)


def restore_model(config: Any, workdir: str | epath.Path, step: int | None = None,
                  ema: str | None = None) -> tuple[nnx.Module, int]:
  """`(model, step)`: the network of checkpoint `step` (None: the latest) with EMA parameters.

  Args:
    config: the run's config (checked against the checkpoint's: `check_compatible`).
    workdir: the training run's directory.
    step: a saved step; a missing one is an error listing the saved steps.
    ema: the EMA's name (e.g. '0p999'); None: `sampling.ema`, or the first decay;
      'params': the raw training parameters.

  The model is ready for `models.make_denoiser` (or `model(z, t, labels, deterministic=True)`)
  and lives on the run's mesh (`config.mesh`).
  """
  restored = restore_params(config, workdir, step, ema)
  return restored.setup.model_def.merge(restored.params, restored.model_state), restored.step
