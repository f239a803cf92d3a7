"""Sampling: one compiled loop from a denoiser to uniform, inpainting, input-guided,
uncertainty-accelerated, autoregressive and RePaint generation (docs/method.md, "Sampling").

The sampler takes any `denoiser(z, t) -> x0_hat | Prediction`; a plan gives every token its
level at every step (`plans.py`, `adaptive.py`), an update rule moves each token from its level to
the next (`updates.py`). `sample` is the entry point; `outpaint` slides it over larger canvases;
`masks` builds token-level known masks; `analytic.GaussianDenoiser` is the exact reference.
"""

from asyncpatch_jax.sampling import analytic, masks
from asyncpatch_jax.sampling.adaptive import (
    ADAPTIVE_RULES,
    BudgetPlan,
    certainty_ratio,
)
from asyncpatch_jax.sampling.input_guidance import DEFAULT_GUIDANCE_LEVEL, input_guided
from asyncpatch_jax.sampling.outpaint import outpaint, window_starts
from asyncpatch_jax.sampling.plans import (
    ORDERS,
    AutoregressivePlan,
    Plan,
    StaticPlan,
    UniformPlan,
    autoregressive_levels,
    autoregressive_num_steps,
)
from asyncpatch_jax.sampling.repaint import repaint_nfe, repaint_times
from asyncpatch_jax.sampling.sampler import STRATEGIES, SamplerState, make_plan, run_plan, sample
from asyncpatch_jax.sampling.updates import UPDATES, ancestral_step, ddim_step, heun_step

__all__ = [
    "ADAPTIVE_RULES",
    "DEFAULT_GUIDANCE_LEVEL",
    "ORDERS",
    "STRATEGIES",
    "UPDATES",
    "AutoregressivePlan",
    "BudgetPlan",
    "Plan",
    "SamplerState",
    "StaticPlan",
    "UniformPlan",
    "analytic",
    "ancestral_step",
    "autoregressive_levels",
    "autoregressive_num_steps",
    "certainty_ratio",
    "ddim_step",
    "heun_step",
    "input_guided",
    "make_plan",
    "masks",
    "outpaint",
    "repaint_nfe",
    "repaint_times",
    "run_plan",
    "sample",
    "window_starts",
]
