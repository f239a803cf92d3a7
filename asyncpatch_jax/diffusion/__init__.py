"""The diffusion core: pure functions for per-token noise levels (see docs/method.md).

Schedules, level maps, asynchronous corruption, parametrisations, the training loss, training
level samplers, level statistics and the ELBO along monotone paths. No Flax state: everything is
jit-, vmap- and sharding-friendly.
"""

from asyncpatch_jax.diffusion import level_samplers, paths
from asyncpatch_jax.diffusion.corruption import corrupt
from asyncpatch_jax.diffusion.elbo import nelbo
from asyncpatch_jax.diffusion.level_map import (
    check_level_shape,
    check_levels,
    expand_levels,
    token_grid,
    tokens_mean,
    tokens_sum,
)
from asyncpatch_jax.diffusion.losses import WEIGHTINGS, diffusion_loss, log_weight
from asyncpatch_jax.diffusion.parametrization import (
    PARAMETRIZATIONS,
    Prediction,
    as_prediction,
    eps_from_x0,
    from_x0,
    target,
    to_prediction,
    to_x0,
    v_from_x0,
    x0_from_eps,
    x0_from_v,
)
from asyncpatch_jax.diffusion.schedules import (
    CosineSchedule,
    LinearSchedule,
    Schedule,
    get_schedule,
)

__all__ = [
    "PARAMETRIZATIONS",
    "WEIGHTINGS",
    "CosineSchedule",
    "LinearSchedule",
    "Prediction",
    "Schedule",
    "as_prediction",
    "check_level_shape",
    "check_levels",
    "corrupt",
    "diffusion_loss",
    "eps_from_x0",
    "expand_levels",
    "from_x0",
    "get_schedule",
    "level_samplers",
    "log_weight",
    "nelbo",
    "paths",
    "target",
    "to_prediction",
    "to_x0",
    "token_grid",
    "tokens_mean",
    "tokens_sum",
    "v_from_x0",
    "x0_from_eps",
    "x0_from_v",
]
