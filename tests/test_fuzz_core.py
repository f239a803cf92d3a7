"""Fuzzing the diffusion core's public API: bad input fails cleanly, good input stays finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpatch_jax import diffusion as d

# derandomize: the same examples every run, so a failure reproduces (and CI cannot flake).
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
CLEAN_ERRORS = (ValueError, TypeError)
dims = st.integers(1, 6)


@SETTINGS
@given(batch=dims, spatial=st.lists(dims, min_size=0, max_size=4), channels=dims,
       t_spatial=st.lists(dims, min_size=0, max_size=4), patch=st.integers(0, 4))
def test_expand_levels_any_shapes(batch, spatial, channels, t_spatial, patch):
  x_shape = (batch, *spatial, channels)
  t = np.full((batch, *t_spatial), 0.5, np.float32)
  try:
    out = d.expand_levels(t, x_shape, patch)
  except CLEAN_ERRORS:
    return
  assert out.shape == x_shape
  assert np.all(np.asarray(out) == 0.5)


@SETTINGS
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4,
                       max_size=4))
def test_level_values_are_checked(values):
  t = np.asarray(values, np.float32).reshape(1, 2, 2)
  x = jnp.ones((1, 2, 2, 1))
  try:
    z = d.corrupt(x, t, jnp.zeros_like(x), d.get_schedule())
  except CLEAN_ERRORS:
    assert not (np.all(np.isfinite(t)) and t.min() >= 0 and t.max() <= 1)
    return
  assert np.all(np.isfinite(np.asarray(z)))


@SETTINGS
@given(name=st.text(max_size=8), lo=st.floats(-50, 50), hi=st.floats(-50, 50),
       t=st.floats(0, 1))
def test_schedules_finite_or_clean_error(name, lo, hi, t):
  for n in (name, "cosine", "linear"):
    try:
      s = d.get_schedule(n, log_snr_min=lo, log_snr_max=hi)
    except CLEAN_ERRORS:
      continue
    alpha, sigma = s.alpha_sigma(jnp.float32(t))
    assert np.isfinite(float(s.log_snr(jnp.float32(t))))
    assert np.isfinite(float(s.dlog_snr_dt(jnp.float32(t))))
    assert 0 <= float(alpha) <= 1 and 0 <= float(sigma) <= 1


@SETTINGS
@given(parametrization=st.sampled_from(["eps", "x0", "v", "score", ""]),
       weighting=st.sampled_from(["eps", "x0", "v", "elbo", "snr", None]),
       t_value=st.floats(0, 1), out_channels=st.integers(1, 3))
def test_loss_finite_for_every_level_or_clean_error(parametrization, weighting, t_value,
                                                    out_channels):
  x0 = jnp.linspace(-1, 1, 2 * 4 * 4 * 2).reshape(2, 4, 4, 2)
  out = jnp.zeros((2, 4, 4, out_channels))
  t = jnp.full((2, 2, 2), t_value)
  try:
    res = d.diffusion_loss(out, x0, jnp.ones_like(x0), t, schedule=d.get_schedule(),
                           parametrization=parametrization, weighting=weighting, patch_size=2,
                           log_variance=jnp.zeros_like(x0))
  except CLEAN_ERRORS:
    assert (parametrization not in d.PARAMETRIZATIONS or weighting not in (*d.WEIGHTINGS, None)
            or out_channels != 2)
    return
  for v in res.values():
    assert np.all(np.isfinite(np.asarray(v)))


@SETTINGS
@given(name=st.sampled_from(["iid", "homogeneous", "controlled", "mask", "staircase", "x"]),
       field=st.sampled_from([None, "t_min", "p_hom", "kappa", "max_overlap", "bogus"]),
       value=st.floats(-2, 2), grid=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_level_samplers_from_any_config(name, field, value, grid):
  cfg = {"name": name}
  if field is not None:
    cfg[field] = value
  try:
    sampler = d.level_samplers.from_config(cfg)
  except CLEAN_ERRORS:
    return
  t = np.asarray(sampler(jax.random.key(0), (3, *grid)))
  assert t.shape == (3, *grid)
  assert np.all(np.isfinite(t)) and t.min() >= 0 and t.max() <= 1


@pytest.mark.parametrize("bad", [
    lambda s: s ** 2 - 0.5,                       # starts below 0
    lambda s: jnp.full((3,), s),                  # wrong grid
    lambda s: 1.0 - s,                            # decreasing
    lambda s: jnp.where(s > 0.5, jnp.nan, s),     # not finite
    "not a path",
])
def test_bad_paths_fail_cleanly(bad):
  x = jnp.zeros((2, 4, 1))
  with pytest.raises(CLEAN_ERRORS):
    d.nelbo(lambda z, t: z, x, jax.random.key(0), schedule=d.get_schedule(), path=bad,
            num_steps=2)
