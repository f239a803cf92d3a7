"""The adapter from a network to the core's denoiser protocol `(z, t) -> Prediction`.

Classifier-free guidance is applied in x0 space, x̂ = x̂_c + w (x̂_c − x̂_∅), with both branches in
one batched call on `[cond; null]` (one network evaluation of twice the batch). In x0 space the
guided estimate is the same whatever the network's parametrisation, and since ε̂ and v̂ are affine
in x̂0 at fixed (z, t), it equals guidance applied to them. The variance (uncertainty) is the
conditional branch's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from asyncpatch_jax.diffusion.level_map import PatchSize
from asyncpatch_jax.diffusion.parametrization import Prediction, to_prediction
from asyncpatch_jax.diffusion.schedules import Schedule
from asyncpatch_jax.models.common import ModelOutput

Array = jax.Array
Denoiser = Callable[[Array, Array], Prediction]


def _as_callable(model) -> Callable[..., ModelOutput]:
  """A module, or an `nnx.split` pair `(graphdef, state)` merged at call time (inside jit)."""
  if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
    graphdef, state = model
    return lambda *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs)
  if not callable(model):
    raise TypeError(f"make_denoiser needs an nnx.Module or an nnx.split (graphdef, state) pair, "
                    f"got {type(model).__name__}")
  return model


def make_denoiser(model, *, schedule: Schedule, parametrization: str, patch_size: PatchSize,
                  labels: Array | None = None, cfg_scale: float | Array = 0.0,
                  num_classes: int = 0) -> Denoiser:
  """Turns a network into `denoiser(z, t) -> Prediction(x0, variance)`.

  Args:
    model: the network (`model(z, t, labels) -> ModelOutput`), or `nnx.split(model)`.
    schedule, parametrization, patch_size: how the network's output and `t` are read; the
      parametrisation must be the one the model was built with.
    labels: int `[B]` class labels (None: the null class; ignored by unconditional models).
    cfg_scale: guidance weight w; 0 (a Python number) skips the unconditional branch. A traced
      scale always runs both branches.
    num_classes: the model's class count; the null label is `num_classes`.

  The returned function is pure given the model (evaluated with `deterministic=True`), so it can
  run inside `jit` and `lax.scan`.
  """
  net = _as_callable(model)
  model_param = getattr(model, "parametrization", None)
  if model_param is not None and model_param != parametrization:
    raise ValueError(f"make_denoiser: parametrization {parametrization!r} but the model outputs "
                     f"{model_param!r}")
  model_classes = getattr(model, "num_classes", None)
  if model_classes is not None and model_classes != num_classes:
    raise ValueError(f"make_denoiser: num_classes={num_classes} but the model has "
                     f"{model_classes} classes")
  static_zero = isinstance(cfg_scale, int | float) and cfg_scale == 0
  if num_classes == 0 and not static_zero:
    raise ValueError("make_denoiser: classifier-free guidance (cfg_scale != 0) needs a class-"
                     "conditional model (num_classes > 0)")
  guided = num_classes > 0 and labels is not None and not static_zero

  def predict(output: ModelOutput, z: Array, t: Array) -> Prediction:
    return to_prediction(output.output, z, t, schedule=schedule, parametrization=parametrization,
                         patch_size=patch_size, log_variance=output.log_variance)

  def denoiser(z: Array, t: Array) -> Prediction:
    if not guided:
      return predict(net(z, t, labels, deterministic=True), z, t)
    batch = z.shape[0]
    t = jnp.broadcast_to(t, (batch, *jnp.shape(t)[1:]))
    y = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (batch,))
    null = jnp.full_like(y, num_classes)
    both = net(jnp.concatenate([z, z]), jnp.concatenate([t, t]), jnp.concatenate([y, null]),
               deterministic=True)
    cond = predict(jax.tree.map(lambda a: a[:batch], both), z, t)
    uncond_x0 = predict(jax.tree.map(lambda a: a[batch:], both), z, t).x0
    x0 = cond.x0 + jnp.asarray(cfg_scale, cond.x0.dtype) * (cond.x0 - uncond_x0)
    return Prediction(x0=x0, variance=cond.variance)

  return denoiser
