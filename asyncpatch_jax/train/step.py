"""One training step: level maps, asynchronous corruption, the loss, gradients, AdamW, EMA.

The step is a pure function `(state, batch) -> (state, metrics)`; `jit_train_step` compiles it
over the mesh with the state donated. All randomness derives from one root key folded with the
step number (and the microbatch index under gradient accumulation), so a resumed run, a sharded
run and an unsharded run draw the same level maps, noise and label drops.
"""

# No `from __future__ import annotations`: clu's Collection reads its metric annotations at runtime.
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import diffusion, models, pixels
from asyncpatch_jax.data import sources as data_sources
from asyncpatch_jax.diffusion import level_samplers
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train.builders import make_schedule, train_rng_root
from asyncpatch_jax.train.mesh import BATCH_AXES
from asyncpatch_jax.train.state import ModelDef, StateSetup, TrainState

NO_FAILURE = jnp.iinfo(jnp.int32).max


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
  """The first step whose loss or gradient was not finite (`NO_FAILURE` if none).

  Merged on the device, so the host can check it at log / checkpoint time without a sync
  every step, and still name the exact step.
  """

  step: jax.Array

  @classmethod
  def from_model_output(cls, *, step: jax.Array, finite: jax.Array, **_) -> "FirstNonFinite":
    return cls(step=jnp.where(finite, NO_FAILURE, step).astype(jnp.int32))

  def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
    return type(self)(step=jnp.minimum(self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step

  @classmethod
  def empty(cls) -> "FirstNonFinite":
    return cls(step=jnp.asarray(NO_FAILURE, jnp.int32))


@flax.struct.dataclass
class NonFiniteCount(metrics.Metric):
  """How many steps had a non-finite loss or gradient (skipped under
  `optimizer.skip_nonfinite_updates`, else fatal)."""

  count: jax.Array

  @classmethod
  def from_model_output(cls, *, finite: jax.Array, **_) -> "NonFiniteCount":
    return cls(count=jnp.logical_not(finite).astype(jnp.int32))

  def merge(self, other: "NonFiniteCount") -> "NonFiniteCount":
    return type(self)(count=self.count + other.count)

  def compute(self) -> jax.Array:
    return self.count

  @classmethod
  def empty(cls) -> "NonFiniteCount":
    return cls(count=jnp.asarray(0, jnp.int32))


def _finite_average(name: str) -> type[metrics.Average]:
  """`Average.from_output(name)` over the finite steps only, so a skipped bad batch does not
  turn the logged mean into NaN."""

  @flax.struct.dataclass
  class FiniteAverage(metrics.Average):
    @classmethod
    def from_model_output(cls, **outputs) -> metrics.Average:
      finite = jnp.asarray(outputs["finite"])
      value = jnp.where(finite, jnp.asarray(outputs[name], jnp.float32), 0.0)
      return cls(total=value, count=finite.astype(jnp.int32))

  return FiniteAverage


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: _finite_average("loss")
  mse: _finite_average("mse")
  nll: _finite_average("nll")
  grad_norm: _finite_average("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  mean_level: _finite_average("mean_level")
  first_nonfinite_step: FirstNonFinite
  nonfinite_steps: NonFiniteCount


def make_loss_fn(config: Any, model_def: ModelDef, *, train: bool = True) -> Callable:
  """`loss_fn(params, model_state, batch, key) -> (loss, (aux, model_state))`.

  `train=False` evaluates the same objective with dropout off and labels kept.
  """
  schedule = make_schedule(config.diffusion)
  level_sampler = level_samplers.from_config(config.diffusion.level_sampler)
  patch = int(config.diffusion.patch_size)
  parametrization = str(config.model.parametrization)
  weighting = config.diffusion.weighting or None
  variance_weight = float(config.diffusion.variance_weight)
  num_classes = int(config.model.num_classes)
  label_dropout = float(config.model.label_dropout)
  latents = data_sources.latent_data(config.data)  # float32 batches, the model's data already

  def loss_fn(params, model_state, batch, key):
    x0 = (jnp.asarray(batch["image"], jnp.float32) if latents
          else pixels.to_model_range(batch["image"]))
    k_level, k_noise, k_label, k_model = jax.random.split(key, 4)
    t = level_sampler(k_level, diffusion.token_grid(x0.shape, patch))
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    z = diffusion.corrupt(x0, t, noise, schedule, patch)
    labels = None
    if num_classes > 0 and not train:
      labels = batch["label"].astype(jnp.int32)
    elif num_classes > 0:
      labels = models.drop_labels(k_label, batch["label"].astype(jnp.int32), label_dropout,
                                  num_classes)
    # Fresh Variables in this trace: `model_state` is not differentiated, so under
    # value_and_grad it arrives as the caller's Variables, and a network that updates its
    # state (running statistics) would raise flax's TraceContextError.
    model = model_def.merge(params, jax.tree.map(jnp.asarray, model_state), k_model)
    out = model(z, t, labels, deterministic=not train)
    losses = diffusion.diffusion_loss(
        out.output.astype(jnp.float32), x0, noise, t, schedule=schedule,
        parametrization=parametrization, weighting=weighting, patch_size=patch,
        log_variance=None if out.log_variance is None else out.log_variance.astype(jnp.float32),
        variance_weight=variance_weight)
    new_model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)[3]
    aux = {k: v.mean() for k, v in losses.items()}
    aux["mean_level"] = t.mean()
    return aux["loss"], (aux, new_model_state)

  return loss_fn


def _microbatches(batch: dict[str, jax.Array], k: int,
                  sharding: NamedSharding) -> dict[str, jax.Array]:
  """[B, ...] → [k, B/k, ...] taking every k-th row, so each device keeps its share."""
  def split(x):
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, sharding)
  return jax.tree.map(split, batch)


def make_train_step(config: Any, setup: StateSetup) -> Callable:
  """The pure train step `(state, batch) -> (state, TrainMetrics)`."""
  loss_fn = make_loss_fn(config, setup.model_def)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  tx = setup.tx
  accum = int(config.optimizer.grad_accum_steps)
  decays = tuple(float(d) for d in config.optimizer.ema_decays)
  ema_warmup = bool(config.optimizer.ema_warmup)
  lr_schedule = opt_lib.learning_rate_schedule(config.optimizer, int(config.num_steps))
  root = train_rng_root(config)
  skip_nonfinite = int(config.optimizer.skip_nonfinite_updates) > 0
  micro_sharding = NamedSharding(setup.mesh, P(None, BATCH_AXES))

  def train_step(state: TrainState, batch: dict[str, jax.Array]
                 ) -> tuple[TrainState, "TrainMetrics"]:
    key = jax.random.fold_in(root, state.step)
    if accum == 1:
      (_, (aux, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
    else:
      micro = _microbatches(batch, accum, micro_sharding)

      def body(carry, inputs):
        grads_sum, aux_sum, model_state = carry
        i, mb = inputs
        (_, (aux, model_state)), grads = grad_fn(state.params, model_state, mb,
                                                 jax.random.fold_in(key, i))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        return (grads_sum, aux_sum, model_state), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      aux0 = {k: jnp.zeros((), jnp.float32) for k in ("loss", "mse", "nll", "mean_level")}
      (grads, aux, model_state), _ = jax.lax.scan(
          body, (zeros, aux0, state.model_state), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      aux = jax.tree.map(lambda a: a / accum, aux)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = opt_lib.update_ema(state.ema, params, state.step, decays, ema_warmup)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state, ema=ema)
    finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # a bad batch keeps parameters, optimizer, EMAs; the step still advances
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                               new_state.replace(step=state.step), state
                               ).replace(step=state.step + 1)
      params = new_state.params
    step_metrics = TrainMetrics.single_from_model_output(
        loss=aux["loss"], mse=aux["mse"], nll=aux["nll"], mean_level=aux["mean_level"],
        grad_norm=grad_norm, param_norm=optax.global_norm(params),
        learning_rate=lr_schedule(state.step), step=state.step + 1, finite=finite)
    return new_state, step_metrics

  return train_step


def jit_train_step(train_step: Callable, setup: StateSetup,
                   batch_sharding: NamedSharding) -> Callable:
  """jit over the mesh: state in/out with its shardings (donated), batch split over devices."""
  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(train_step, in_shardings=(setup.shardings, batch_sharding),
                 out_shardings=(setup.shardings, replicated), donate_argnums=(0,))
