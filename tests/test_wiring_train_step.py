"""The train step's wiring on a toy network (compiles in seconds): gradient accumulation equals
the explicit mean over microbatches, the model state is carried through them, and label dropout
reaches the loss (issue 25).

The toy network is linear in its inputs with a label embedding (so labels change the gradient) and
counts its calls in a non-parameter variable (so a lost `model_state` shows). It replaces
`builders.build_model`, so everything else (level maps, corruption, loss, keys, optimizer) is the
real step. The optimizer is SGD with learning rate 1, so `params_after = params − gradient`.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax.data import sources  # noqa: E402
from asyncpatch_jax.models.common import ModelOutput  # noqa: E402
from asyncpatch_jax.train import builders  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from asyncpatch_jax.train import state as state_lib  # noqa: E402
from asyncpatch_jax.train import step as step_lib  # noqa: E402
from configs import digits  # noqa: E402

NUM_CLASSES = 10


class CallCount(nnx.Variable):
  """A non-parameter, non-RNG variable: it lands in `TrainState.model_state`."""


class ToyNet(nnx.Module):
  def __init__(self, channels: int, rngs: nnx.Rngs):
    k1, k2 = jax.random.split(rngs.params())
    self.mix = nnx.Param(jnp.eye(channels) + 0.3 * jax.random.normal(k1, (channels, channels)))
    self.level = nnx.Param(jnp.full((channels,), 0.5))
    self.embed = nnx.Param(jax.random.normal(k2, (NUM_CLASSES + 1, channels)))
    self.calls = CallCount(jnp.zeros((), jnp.int32))

  def __call__(self, z, t, labels, deterministic=True):
    self.calls.value = self.calls.value + 1
    out = z @ self.mix.value + t[..., None] * self.level.value
    if labels is not None:
      out = out + self.embed.value[labels][:, None, None, :]
    return ModelOutput(output=out)


@pytest.fixture
def toy_net(monkeypatch):
  monkeypatch.setattr(builders, "build_model",
                      lambda config, rngs: ToyNet(int(config.data.channels), rngs))


def _config(accum=1, label_dropout=0.1):
  config = digits.get_config("debug")
  config.mesh.data, config.mesh.fsdp = 1, 1
  config.data.batch_size = 8
  config.optimizer.grad_accum_steps = accum
  config.optimizer.grad_clip_norm = 0.0
  config.model.label_dropout = label_dropout
  return config


def _setup(config):
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.setup_state(config, mesh, optax.sgd(1.0))
  return setup, jax.jit(step_lib.make_train_step(config, setup))


def _batch(n=8):
  src = sources.digits_source("train")
  return {"image": np.stack([src[i]["image"] for i in range(n)]),
          "label": np.asarray([src[i]["label"] for i in range(n)], np.int32)}


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _grad(config, setup, params, model_state, batch, key, train=True):
  """(loss, gradient) of one call of the step's objective (`train=False`: the eval branch)."""
  loss_fn = step_lib.make_loss_fn(config, setup.model_def, train=train)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, model_state, batch, key)
  return loss, grads


def test_grad_accumulation_equals_the_mean_of_k_microbatch_gradients(toy_net):
  """k = 4: microbatch i is rows i, i + k, … with key fold_in(fold_in(root, step), i); the update
  is the mean of the k gradients, the logged loss the mean of the k losses."""
  k = 4
  config = _config(accum=k)
  setup, train_step = _setup(config)
  state = setup.init(config)
  params = jax.tree.map(np.asarray, state.params)
  batch = _batch()
  key = jax.random.fold_in(builders.train_rng_root(config), 0)  # step 0
  losses, grads = zip(*(_grad(config, setup, params, state.model_state,
                              jax.tree.map(lambda x, i=i: x[i::k], batch),
                              jax.random.fold_in(key, i)) for i in range(k)))
  mean_grad = jax.tree.map(lambda *g: sum(g) / k, *grads)
  # The microbatch gradients differ (else a shared key or a dropped 1/k could hide).
  assert not np.allclose(jax.tree.leaves(grads[0])[0], jax.tree.leaves(grads[1])[0])

  new_state, metrics = train_step(state, batch)
  _assert_trees_close(new_state.params, jax.tree.map(lambda p, g: p - g, params, mean_grad))
  out = metrics.compute()
  np.testing.assert_allclose(out["grad_norm"], optax.global_norm(mean_grad), rtol=1e-5)
  np.testing.assert_allclose(out["loss"], np.mean(losses), rtol=1e-5)


def test_grad_accumulation_carries_the_model_state_through_every_microbatch(toy_net):
  """The network's non-parameter variables see all k microbatch calls, step after step."""
  k = 3
  config = _config(accum=k)
  config.data.batch_size = 6
  setup, train_step = _setup(config)
  state = setup.init(config)
  assert int(state.model_state["calls"].value) == 0
  for step in (1, 2):
    state, _ = train_step(state, _batch(6))
    assert int(state.model_state["calls"].value) == k * step


def test_label_dropout_one_trains_the_null_class_everywhere(toy_net):
  """label_dropout = 1 on the real labels is the same update as label_dropout = 0 on a batch whose
  labels are all the null class; and it differs from training on the real labels."""
  batch = _batch()
  null = dict(batch, label=np.full_like(batch["label"], NUM_CLASSES))
  after = {}
  for name, dropout, b in (("dropped", 1.0, batch), ("null", 0.0, null), ("kept", 0.0, batch)):
    config = _config(label_dropout=dropout)
    setup, train_step = _setup(config)
    after[name] = jax.tree.map(np.asarray, train_step(setup.init(config), b)[0].params)
  _assert_trees_close(after["dropped"], after["null"], rtol=1e-6, atol=1e-7)
  assert not np.allclose(after["dropped"]["embed"].value, after["kept"]["embed"].value)
  # Only the null row of the label embedding was trained.
  init = jax.tree.map(np.asarray, setup.init(config).params)["embed"].value
  moved = ~np.all(np.isclose(after["dropped"]["embed"].value, init), axis=1)
  assert moved.tolist() == [False] * NUM_CLASSES + [True]


def test_label_dropout_zero_trains_on_the_eval_branch_loss(toy_net):
  """label_dropout = 0: the train step's gradient is that of the eval objective
  (`make_loss_fn(train=False)`: labels kept) under the step's key."""
  config = _config(label_dropout=0.0)
  setup, train_step = _setup(config)
  state = setup.init(config)
  params = jax.tree.map(np.asarray, state.params)
  batch = _batch()
  key = jax.random.fold_in(builders.train_rng_root(config), 0)
  loss, grad = _grad(config, setup, params, state.model_state, batch, key, train=False)
  new_state, metrics = train_step(state, batch)
  _assert_trees_close(new_state.params, jax.tree.map(lambda p, g: p - g, params, grad))
  np.testing.assert_allclose(metrics.compute()["loss"], loss, rtol=1e-6)
