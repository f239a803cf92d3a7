"""The train state (a pytree of arrays) and its construction onto the mesh.

The network's NNX graph definition is static and kept apart (`ModelDef`); the state holds only
arrays, so it can be jitted, donated, sharded and checkpointed as one pytree. RNG streams the
network may keep (dropout) are not state: every step reseeds them from the run's one RNG root.
What the config builds (schedule, example shape, network, RNG roots) is `train/builders.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from asyncpatch_jax.train import builders
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: number of optimizer updates applied so far (int32 scalar).
    params: the network's `nnx.Param` variables.
    model_state: the network's other non-RNG variables (e.g. running statistics); often empty.
    opt_state: the optax state.
    ema: `{ema_name(decay): params}` exponential moving averages of `params`.
  """

  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: Any
  ema: dict[str, nnx.State]


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The static half of the network: its graph and a template of its RNG streams."""

  graphdef: Any
  rng_state: nnx.State

  def merge(self, params: nnx.State, model_state: nnx.State,
            key: jax.Array | None = None) -> nnx.Module:
    """The network; with `key`, its RNG streams (dropout) are freshly seeded from it."""
    return nnx.merge(self.graphdef, params, self.seeded_rng_state(key), model_state)

  def seeded_rng_state(self, key: jax.Array | None) -> nnx.State:
    """A copy of the RNG template (new Variables, so tracing never mutates the template), each
    stream key replaced by `fold_in(key, i)`."""
    leaves, treedef = jax.tree.flatten(self.rng_state)
    out = []
    for i, leaf in enumerate(leaves):
      is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
      if is_key and key is not None:
        out.append(jax.random.fold_in(key, i))
      else:
        out.append(jnp.array(leaf))
    return jax.tree.unflatten(treedef, out)


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State, nnx.State]:
  """(graphdef, params, rng_state, model_state)."""
  graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return graphdef, params, rng_state, model_state


def _init_fn(config: Any, tx: optax.GradientTransformation):
  names = opt_lib.ema_names(config.optimizer.ema_decays)

  def init(key: jax.Array) -> tuple[TrainState, nnx.State]:
    model = builders.build_model(config, builders.model_rngs(key))
    _, params, rng_state, model_state = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=tx.init(params),
        ema={n: jax.tree.map(jnp.copy, params) for n in names})
    return state, rng_state

  return init


@dataclasses.dataclass
class StateSetup:
  """What the trainer needs to create, restore and jit the state on a mesh."""

  model_def: ModelDef
  abstract: TrainState        # ShapeDtypeStructs carrying the shardings (restore target)
  shardings: TrainState       # NamedShardings, leaf for leaf
  tx: optax.GradientTransformation
  mesh: Mesh

  def init(self, config: Any) -> TrainState:
    """Fresh parameters, created directly in their shards (no full copy on one device)."""
    init = _init_fn(config, self.tx)
    rng_sharding = jax.tree.map(lambda _: mesh_lib.replicated(self.mesh),
                                self.model_def.rng_state)
    out_shardings = (self.shardings, rng_sharding)
    state, _ = jax.jit(init, out_shardings=out_shardings)(builders.init_key(config))
    return state


def num_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def setup_state(config: Any, mesh: Mesh, tx: optax.GradientTransformation) -> StateSetup:
  """Abstract state via `eval_shape`, then shardings from the config's rules over it."""
  init = _init_fn(config, tx)
  abstract, abstract_rng = jax.eval_shape(init, builders.init_key(config))
  # The graph definition and the RNG template come from an abstract model (nothing allocated
  # but the small RNG keys, which are created for real so they can be reseeded).
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: builders.build_model(config, builders.model_rngs(builders.init_key(config)))))
  rng_state = jax.tree.map(
      lambda s: jax.random.key(0) if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
      else jnp.zeros(s.shape, s.dtype), abstract_rng)
  rules = [tuple(r) for r in config.mesh.rules]
  min_size = int(config.mesh.min_shard_size)
  params_sh = mesh_lib.param_shardings(abstract.params, mesh, rules, min_size)
  shardings = TrainState(
      step=mesh_lib.replicated(mesh),
      params=params_sh,
      model_state=jax.tree.map(lambda _: mesh_lib.replicated(mesh), abstract.model_state),
      opt_state=mesh_lib.shard_like_params(abstract.opt_state, abstract.params, params_sh, mesh),
      ema={k: params_sh for k in abstract.ema},
  )
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
  return StateSetup(model_def=ModelDef(graphdef, rng_state), abstract=abstract,
                    shardings=shardings, tx=tx, mesh=mesh)


def describe_shardings(shardings: TrainState) -> dict[str, str]:
  """'path' → PartitionSpec string for the parameters (for logs and tests)."""
  out = {}
  for path, sh in jax.tree_util.tree_flatten_with_path(
      shardings.params, is_leaf=lambda x: isinstance(x, NamedSharding))[0]:
    out[mesh_lib.path_string(path)] = str(sh.spec)
  return out
