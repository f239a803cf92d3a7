"""The EMA's values: `ema ← d·ema + (1 − d)·params` with the decay of the right step, by hand and
through one real train step from initialisation (issue 25)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax.data import sources  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from asyncpatch_jax.train import optimizer as opt_lib  # noqa: E402
from asyncpatch_jax.train import state as state_lib  # noqa: E402
from asyncpatch_jax.train import step as step_lib  # noqa: E402
from configs import digits  # noqa: E402


@pytest.mark.parametrize("step", [0, 7, 10**6])
def test_ema_decay_without_warmup_is_the_configured_decay(step):
  assert float(opt_lib.ema_decay(0.999, jnp.int32(step), warmup=False)) == pytest.approx(0.999)


@pytest.mark.parametrize("step, expected", [
    (0, 1 / 10),      # the first update: (1 + 0) / (10 + 0)
    (1, 2 / 11),
    (10, 11 / 20),
    (10**6, 0.999),   # (1 + n) / (10 + n) has passed the configured decay
])
def test_ema_decay_with_warmup_is_min_of_decay_and_one_plus_n_over_ten_plus_n(step, expected):
  assert float(opt_lib.ema_decay(0.999, jnp.int32(step), warmup=True)) == pytest.approx(expected)


@pytest.mark.parametrize("warmup, step, expected", [
    # e = 2, p = 10: d·e + (1 − d)·p for d = 0.9 and d = 0.5.
    (False, 0, {"0p9": 0.9 * 2 + 0.1 * 10, "0p5": 0.5 * 2 + 0.5 * 10}),
    # Warm-up at step 3: d = min(decay, 4/13) = 4/13 for both.
    (True, 3, {"0p9": 4 / 13 * 2 + 9 / 13 * 10, "0p5": 4 / 13 * 2 + 9 / 13 * 10}),
    # Warm-up at step 20: min(0.9, 21/30 = 0.7) = 0.7, min(0.5, 0.7) = 0.5.
    (True, 20, {"0p9": 0.7 * 2 + 0.3 * 10, "0p5": 0.5 * 2 + 0.5 * 10}),
])
def test_update_ema_is_d_times_ema_plus_one_minus_d_times_params(warmup, step, expected):
  params = {"w": jnp.full((3,), 10.0), "b": jnp.full((), 10.0, jnp.bfloat16)}
  ema = {name: {"w": jnp.full((3,), 2.0), "b": jnp.full((), 2.0, jnp.bfloat16)}
         for name in ("0p9", "0p5")}
  out = opt_lib.update_ema(ema, params, jnp.int32(step), (0.9, 0.5), warmup)
  assert set(out) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(out[name]["w"], np.full((3,), value), rtol=1e-6)
    assert out[name]["b"].dtype == jnp.bfloat16  # kept in the EMA's dtype
    np.testing.assert_allclose(np.float32(out[name]["b"]), value, rtol=1e-2)


def _digits_batch(n):
  src = sources.digits_source("train")
  return {"image": np.stack([src[i]["image"] for i in range(n)]),
          "label": np.asarray([src[i]["label"] for i in range(n)], np.int32)}


def test_two_real_train_steps_from_init_move_each_ema_by_its_warmed_up_decay():
  """digits:debug from initialisation: after update n (counted from 0) each EMA is
  d_n·ema + (1 − d_n)·params_new with d_n = min(decay, (1 + n)/(10 + n)); one decay below the
  warm-up value (0.05) and one above it (0.999) cover both sides of the min."""
  config = digits.get_config("debug")
  config.mesh.data, config.mesh.fsdp = 1, 1
  config.optimizer.warmup_steps = 0
  config.optimizer.ema_decays = (0.05, 0.999)
  config.optimizer.ema_warmup = True
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.setup_state(config, mesh, opt_lib.make_optimizer(config.optimizer, 4))
  train_step = jax.jit(step_lib.make_train_step(config, setup))
  batch = _digits_batch(int(config.data.batch_size))
  state = setup.init(config)
  host = lambda tree: jax.tree.map(np.asarray, tree)
  init_params = host(state.params)
  ema = {name: init_params for name in state.ema}
  for n in (0, 1):
    state, _ = train_step(state, batch)
    params = host(state.params)
    assert int(state.step) == n + 1
    for decay in config.optimizer.ema_decays:
      name = opt_lib.ema_name(decay)
      d = min(decay, (1 + n) / (10 + n))
      ema[name] = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema[name], params)
      for got, want in zip(jax.tree.leaves(host(state.ema[name])), jax.tree.leaves(ema[name])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The parameters did move, so the comparison above had something to see.
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(init_params),
                                                    jax.tree.leaves(host(state.params))))
