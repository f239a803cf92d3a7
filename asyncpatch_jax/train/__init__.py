"""The training system: state, optimizer, mesh and shardings, checkpoints, the loop."""

from asyncpatch_jax.train.checkpoint import Checkpointer
from asyncpatch_jax.train.state import StateSetup, TrainState, setup_state
from asyncpatch_jax.train.trainer import NonFiniteError, prepare, train_and_evaluate
from asyncpatch_jax.train.validation import ConfigError, validate_config, validate_topology

__all__ = [
    "Checkpointer",
    "ConfigError",
    "NonFiniteError",
    "StateSetup",
    "TrainState",
    "prepare",
    "setup_state",
    "train_and_evaluate",
    "validate_config",
    "validate_topology",
]
