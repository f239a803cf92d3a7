"""The parametrisation conversions against one case worked by hand per parametrisation (issue 25).

The other tests check the conversions against each other, which a sign convention shared by all
of them would pass. Here: α = 0.6, σ = 0.8 (α² + σ² = 1), x0 = 0.5, ε = 2, so
  z  = α x0 + σ ε      = 0.3 + 1.6       = 1.9
  v  = α ε − σ x0      = 1.2 − 0.4       = 0.8
and an output error δ = 0.3 moves x̂0 by −σ/α·δ = −0.4 (ε), δ = 0.3 (x0), −σ·δ = −0.24 (v).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import parametrization as param

ALPHA, SIGMA = 0.6, 0.8
X0, EPS = 0.5, 2.0
Z, V = 1.9, 0.8
DELTA = 0.3
LOG_SNR = math.log(ALPHA**2 / SIGMA**2)

# parametrisation: (target, x̂0 error for an output error DELTA)
CASES = {
    "eps": (EPS, -SIGMA / ALPHA * DELTA),
    "x0": (X0, DELTA),
    "v": (V, -SIGMA * DELTA),
}


def _a(x):
  return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_target_to_x0_and_from_x0_on_the_hand_worked_case(name):
  want_target, _ = CASES[name]
  target = param.target(_a(X0), _a(EPS), _a(ALPHA), _a(SIGMA), name)
  np.testing.assert_allclose(target, want_target, rtol=1e-6)
  np.testing.assert_allclose(param.to_x0(_a(want_target), _a(Z), _a(ALPHA), _a(SIGMA), name),
                             X0, rtol=1e-6)
  np.testing.assert_allclose(param.from_x0(_a(X0), _a(Z), _a(ALPHA), _a(SIGMA), name),
                             want_target, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_error_scales_x0_error_as_worked_by_hand(name):
  """to_x0 of (target + δ) is off by the hand-worked amount, and log_x0_error_scale is the log of
  (that error / δ)²: σ²/α² for ε, 1 for x0, σ² for v."""
  want_target, x0_error = CASES[name]
  x0_hat = param.to_x0(_a(want_target + DELTA), _a(Z), _a(ALPHA), _a(SIGMA), name)
  np.testing.assert_allclose(x0_hat - X0, x0_error, rtol=1e-5)
  np.testing.assert_allclose(param.log_x0_error_scale(_a(LOG_SNR), name),
                             math.log((x0_error / DELTA) ** 2), rtol=1e-5, atol=1e-6)


def test_the_pairwise_helpers_on_the_hand_worked_case():
  a, s = _a(ALPHA), _a(SIGMA)
  np.testing.assert_allclose(param.x0_from_eps(_a(Z), _a(EPS), a, s), X0, rtol=1e-6)
  np.testing.assert_allclose(param.eps_from_x0(_a(Z), _a(X0), a, s), EPS, rtol=1e-6)
  np.testing.assert_allclose(param.x0_from_v(_a(Z), _a(V), a, s), X0, rtol=1e-6)
  np.testing.assert_allclose(param.v_from_x0(_a(Z), _a(X0), a, s), V, rtol=1e-6)
