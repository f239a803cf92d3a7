"""The training system and the jobs on its checkpoints, in import order (each module imports only
modules before it): `builders` (what a config builds), `mesh`, `optimizer`, `file_paths`,
`sample_io` (sampling outputs, PIL inputs), `state`, `step`, `checkpoint`, `perf`, `validation`,
`workdir` (input checks, config.json), `restore`, `samples` (grids, the sampling function),
`eval_job` (--mode=eval), `sample_job` (--mode=sample / inpaint), `trainer` (--mode=train).

The names below load on first use (PEP 562), so importing one submodule (e.g. `train.step` in a
benchmark) does not import the trainer and, through CLU's metric writers, TensorFlow.
"""

import importlib

_EXPORTS = {
    "Checkpointer": "checkpoint",
    "ConfigError": "validation",
    "NonFiniteError": "trainer",
    "StateSetup": "state",
    "TrainState": "state",
    "prepare": "workdir",
    "setup_state": "state",
    "train_and_evaluate": "trainer",
    "validate_config": "validation",
    "validate_topology": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
