"""The sampler: one compiled loop that moves every token along its plan.

`sample` is the public entry point; `run_plan` is the loop itself, decoupled from the network
(maskgit-style): it takes a denoise function and a `Plan`, and its state is a small dataclass.
Each iteration makes one (guided) denoiser call at the current level map, asks the plan for the
next levels, and applies the update rule; known tokens are held exactly at their clean values at
level 0 throughout. The loop is a `lax.while_loop` that stops when every token is clean, so a
plan that finishes early (an autoregressive plan's fully known groups) costs only the steps it
takes, and a fully known input costs nothing.

Everything is traceable: wrap `sample` in `jax.jit` (with the configuration bound, e.g.
`jax.jit(functools.partial(sample, denoiser, x_shape=..., schedule=..., num_steps=...))`) to get
one program; no host round trip happens per step (unless `progress` asks for one). Randomness
comes from `rng` alone (folded with the step), so a batch sharded over a mesh gives the same
samples as an unsharded one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from asyncpatch_jax.diffusion import (
    Prediction,
    Schedule,
    as_prediction,
    expand_levels,
    get_schedule,
    token_grid,
    tokens_mean,
)
from asyncpatch_jax.diffusion.level_map import PatchSize
from asyncpatch_jax.sampling import adaptive, repaint
from asyncpatch_jax.sampling import plans as plans_lib
from asyncpatch_jax.sampling import updates as updates_lib
from asyncpatch_jax.sampling.input_guidance import (
    DEFAULT_GUIDANCE_LEVEL,
    KeyedDenoiseFn,
    input_guided,
)

Array = jax.Array
Denoiser = Callable[[Array, Array], Array | Prediction]
STRATEGIES = ("uniform", "adaptive", "autoregressive", "repaint")
X0_DRAWS = ("mean", "last", "every")
_STRATEGY_KWARGS = {
    "uniform": (),
    "autoregressive": ("order", "steps_per_group", "overlap", "group_shape"),
    "repaint": ("jump_length", "resample"),
}


def _budget_defaults() -> dict[str, Any]:
  """The budget rule's keywords with their defaults: `adaptive.BudgetPlan`'s fields but the
  budget and schedule."""
  return {f.name: f.default for f in dataclasses.fields(adaptive.BudgetPlan)
          if f.init and f.name not in ("num_steps", "schedule")}


_BUDGET_KWARGS = tuple(_budget_defaults())


def default_config() -> ml_collections.ConfigDict:
  """Each strategy's keywords with their defaults, one section per strategy ('uniform' takes
  none); a run's config holds them as `config.sampling.<strategy>.<keyword>`. 'adaptive' takes
  `rule` ('budget', the one rule since issue 18; a removed rule's name is a clear error) and its
  keywords `adaptive.budget.*` (`adaptive.BudgetPlan`)."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({
      "adaptive": {"rule": "budget", "budget": _budget_defaults()},
      "autoregressive": {
          "order": "raster",  # 'raster', 'spiral' (centre-out) or 'certainty'
          "steps_per_group": placeholder(int),  # None: what fits num_steps
          # None: 0, or with steps_per_group the overlap that fits num_steps.
          "overlap": placeholder(float),
          # Tokens per group along each axis (an int or a tuple), or 'token', 'row', 'column',
          # 'block<b>'; any type, checked by plans.AutoregressivePlan.
          "group_shape": ml_collections.FieldReference(1, field_type=object),
      },
      "repaint": {"jump_length": 10, "resample": 10},
  })


def strategy_kwargs(strategy: str, options: Any) -> dict[str, Any]:
  """The keywords of `sample(strategy=strategy, ...)` held in `options` (shaped as
  `default_config()`, e.g. a run's `config.sampling`): the strategy's section, for 'adaptive' its
  `rule` and `adaptive.budget`. Unset (None) keywords are left out: the sampler's default."""
  if strategy == "adaptive":
    rule = options.adaptive.rule
    adaptive.check_rule(rule)
    kwargs = {"rule": rule, **options.adaptive.budget.to_dict()}
  elif strategy in ("autoregressive", "repaint"):
    kwargs = options[strategy].to_dict()
  else:
    kwargs = {}
  return {k: v for k, v in kwargs.items() if v is not None}


@flax.struct.dataclass
class SamplerState:
  """The loop state: the step, the noisy sample and its level map, and the bookkeeping."""

  step: Array  # int32 scalar: steps taken
  z: Array  # [B, *spatial, C]
  levels: Array  # [B, *grid]
  plan_state: Any
  nfe: Array  # int32 scalar: denoiser calls made
  nfe_per_example: Array  # [B] int32: calls made while the example still had noisy tokens
  level_history: Array | None  # [max_steps + 1, B, *grid] when levels are recorded


def checked_call(denoiser: Denoiser) -> Callable[[Array, Array], Prediction]:
  """`denoiser` normalised to return a `Prediction` whose shapes match `z` (checked at trace)."""

  def call(z: Array, levels: Array) -> Prediction:
    out = denoiser(z, levels)
    pred = as_prediction(out)
    if not hasattr(pred.x0, "shape") or not hasattr(pred.x0, "astype"):
      raise TypeError(f"the denoiser must return an array x0 or a Prediction, got "
                      f"{type(out).__name__}")
    if tuple(pred.x0.shape) != tuple(z.shape):
      raise ValueError(f"the denoiser returned x0 of shape {tuple(pred.x0.shape)} for z of shape "
                       f"{tuple(z.shape)}; does the model match x_shape / patch_size?")
    variance = pred.variance
    if variance is not None:
      if tuple(variance.shape) != tuple(z.shape):
        raise ValueError(f"the denoiser returned variance of shape {tuple(variance.shape)} for z "
                         f"of shape {tuple(z.shape)}")
      variance = variance.astype(jnp.float32)
    return Prediction(x0=pred.x0.astype(z.dtype), variance=variance)

  return call


def prepare_known(x_shape: Sequence[int], known: Array | None, known_mask: Array | None,
                  patch_size: PatchSize = 1) -> tuple[Array, Array]:
  """Validates and broadcasts (known `[B, *spatial, C]` float32, known_mask `[B, *grid]` bool).

  With neither given, nothing is known.
  """
  x_shape = tuple(int(d) for d in x_shape)
  grid = token_grid(x_shape, patch_size)
  if known_mask is None:
    if known is not None:
      raise ValueError("`known` was given without `known_mask`; pass the token-level mask of "
                       "the known tokens too")
    return jnp.zeros(x_shape, jnp.float32), jnp.zeros(grid, bool)
  if known is None:
    raise ValueError("`known_mask` was given without `known`; pass the clean values of the known "
                     "tokens (any values where the mask is False)")
  known_shape, mask_shape = tuple(jnp.shape(known)), tuple(jnp.shape(known_mask))
  if len(known_shape) != len(x_shape) or known_shape[1:] != x_shape[1:] or known_shape[0] not in (
      1, x_shape[0]):
    raise ValueError(f"`known` has shape {known_shape} but x_shape is {x_shape} (a batch of 1 "
                     f"broadcasts)")
  try:
    ok = np.broadcast_shapes(mask_shape, grid) == grid and len(mask_shape) <= len(grid)
  except ValueError:
    ok = False
  if not ok:
    hint = (" (it looks pixel-level: make it token-level with masks.to_token_mask)"
            if mask_shape[-len(x_shape) + 2:] == x_shape[1:-1] and grid[1:] != x_shape[1:-1]
            else "")
    raise ValueError(f"`known_mask` has shape {mask_shape}, which does not broadcast to the token "
                     f"grid {grid} of x_shape {x_shape} with patch_size {patch_size}{hint}")
  known = jnp.broadcast_to(jnp.asarray(known, jnp.float32), x_shape)
  known_mask = jnp.broadcast_to(jnp.asarray(known_mask).astype(bool), grid)
  if not isinstance(known, jax.core.Tracer) and not isinstance(known_mask, jax.core.Tracer):
    # Known tokens are copied into the output as they are: NaN / inf there would come out silently.
    inside = np.asarray(expand_levels(known_mask.astype(jnp.float32), x_shape, patch_size)) > 0
    if not np.isfinite(np.asarray(known)[inside]).all():
      raise ValueError("`known` has NaN / inf values inside `known_mask`; give finite clean "
                       "values for every known token")
  return known, known_mask


def _guidance_on(input_guidance: float | Array) -> bool:
  """Whether the guided branch runs: a Python ω > 0, or any array ω (checked if concrete)."""
  if isinstance(input_guidance, int | float):
    if input_guidance < 0:
      raise ValueError(f"input_guidance must be >= 0, got {input_guidance}")
    return input_guidance > 0
  if jnp.ndim(input_guidance) != 0:
    raise ValueError(f"input_guidance must be a scalar, got shape {jnp.shape(input_guidance)}")
  if not isinstance(input_guidance, jax.core.Tracer) and float(input_guidance) < 0:
    raise ValueError(f"input_guidance must be >= 0, got {float(input_guidance)}")
  return True


def needs_uncertainty(strategy: str | plans_lib.Plan, options: dict[str, Any]) -> bool:
  """Whether `sample(strategy=..., **options)` reads the uncertainty head's variance."""
  if isinstance(strategy, plans_lib.Plan):
    return strategy.needs_variance or options.get("x0_draw", "mean") != "mean"
  return (strategy == "adaptive" or options.get("order") == "certainty"
          or options.get("x0_draw", "mean") != "mean")


def check_x0_draw(x0_draw: str, update: str) -> None:
  if x0_draw not in X0_DRAWS:
    raise ValueError(f"unknown x0_draw {x0_draw!r}; choose one of {X0_DRAWS}")
  if x0_draw == "every" and update != "ancestral":
    raise ValueError(f"x0_draw='every' widens ancestral steps; update={update!r} has none: use "
                     "update='ancestral' or x0_draw='last'")


def _check_kwargs(where: str, kwargs: dict, allowed: Sequence[str]) -> None:
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"unexpected keyword arguments {unknown} for {where}; it takes "
                     f"{sorted(allowed) or 'none'}")


def _require_steps(strategy: str, num_steps: int | None) -> int:
  if num_steps is None:
    raise ValueError(f"strategy {strategy!r} needs `num_steps`")
  return int(num_steps)


def make_plan(strategy: str | plans_lib.Plan, grid: Sequence[int], num_steps: int | None, *,
              schedule: Schedule, **strategy_kwargs) -> plans_lib.Plan:
  """The plan for a strategy name (or a `Plan`, returned as is) on a token grid `[*grid]`."""
  if isinstance(strategy, plans_lib.Plan):
    _check_kwargs("a Plan strategy", strategy_kwargs, ())
    if num_steps is not None:
      raise ValueError("pass num_steps=None with a Plan: the plan fixes its own steps")
    return strategy
  if strategy == "uniform":
    _check_kwargs("strategy 'uniform'", strategy_kwargs, ())
    return plans_lib.UniformPlan(_require_steps(strategy, num_steps))
  if strategy == "adaptive":
    kwargs = dict(strategy_kwargs)
    rule = kwargs.pop("rule", "budget")
    adaptive.check_rule(rule)
    _check_kwargs(f"adaptive rule {rule!r}", kwargs, _BUDGET_KWARGS)
    return adaptive.make_adaptive_plan(rule, _require_steps(strategy, num_steps), schedule,
                                       **kwargs)
  if strategy == "autoregressive":
    _check_kwargs("strategy 'autoregressive'", strategy_kwargs, _STRATEGY_KWARGS[strategy])
    kwargs = dict(strategy_kwargs)
    steps_per_group = kwargs.pop("steps_per_group", None)
    probe = plans_lib.AutoregressivePlan(tuple(grid), 1, **{**kwargs, "overlap": 0.0})
    if kwargs.get("overlap") is None:
      if steps_per_group is not None and num_steps is not None:
        # A total budget and the steps each group gets: the overlap follows.
        kwargs["overlap"] = plans_lib.autoregressive_overlap(probe.num_groups,
                                                             int(steps_per_group), num_steps)
      else:
        kwargs["overlap"] = 0.0
    if steps_per_group is None:
      steps_per_group = autoregressive_steps_per_group(
          probe.num_groups, _require_steps(strategy, num_steps), kwargs["overlap"])
    plan = plans_lib.AutoregressivePlan(tuple(grid), int(steps_per_group), **kwargs)
    if num_steps is not None and num_steps != plan.max_steps:
      raise ValueError(f"num_steps={num_steps} disagrees with the autoregressive plan's "
                       f"{plan.max_steps} steps ({plan.num_groups} groups, steps_per_group="
                       f"{steps_per_group}, overlap={plan.overlap}); pass one of the two")
    return plan
  raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES} or pass a Plan")


def autoregressive_steps_per_group(num_groups: int, num_steps: int, overlap: float) -> int:
  """The largest S whose autoregressive plan fits in `num_steps` (exactly, when one does)."""
  best = None
  for s in range(1, num_steps + 1):
    total = plans_lib.autoregressive_num_steps(num_groups, s, overlap)
    if total == num_steps:
      return s
    if total < num_steps:
      best = s
  if best is None:
    raise ValueError(f"num_steps={num_steps} is too few for {num_groups} groups with overlap "
                     f"{overlap}: one step per group needs "
                     f"{plans_lib.autoregressive_num_steps(num_groups, 1, overlap)}")
  raise ValueError(f"no steps_per_group gives exactly num_steps={num_steps} for {num_groups} "
                   f"groups with overlap {overlap}; steps_per_group={best} gives "
                   f"{plans_lib.autoregressive_num_steps(num_groups, best, overlap)}: pass that "
                   "as num_steps, or pass steps_per_group instead")


def run_plan(denoise: KeyedDenoiseFn, plan: plans_lib.Plan, rng: Array,
             x_shape: Sequence[int], *, schedule: Schedule, patch_size: PatchSize = 1,
             known: Array, known_mask: Array, update: str = "ancestral",
             x0_draw: str = "mean", return_levels: bool = False,
             progress: Callable[[int, int], None] | None = None) -> tuple[Array, dict]:
  """Runs `plan` with the keyed denoise function; the loop behind `sample`.

  Args:
    denoise: `(z, levels, key) -> (Prediction, calls)`, known tokens already clean in `z`.
    known, known_mask: as returned by `prepare_known`.
    x0_draw: how the update uses the prediction: 'mean' (x̂0, the usual), 'last' (a token
      reaching level 0 becomes a draw from N(x̂0, v), v the uncertainty head's variance) or
      'every' (ancestral steps integrate x over N(x̂0, v); see `updates.ancestral_step`).

  Returns:
    (samples, info) as for `sample`.
  """
  updates_lib.check_update(update)
  check_x0_draw(x0_draw, update)
  x_shape = tuple(int(d) for d in x_shape)
  grid = token_grid(x_shape, patch_size)
  mask_full = expand_levels(known_mask.astype(jnp.float32), x_shape, patch_size) > 0
  init_key, loop_key = jax.random.split(rng)
  levels = jnp.where(known_mask, 0.0, 1.0).astype(jnp.float32)
  z = jnp.where(mask_full, known, jax.random.normal(init_key, x_shape, jnp.float32))
  max_steps = int(plan.max_steps)
  history = None
  if return_levels:
    history = jnp.zeros((max_steps + 1,) + grid, jnp.float32).at[0].set(levels)
  token_axes = tuple(range(1, len(grid)))

  def body(state: SamplerState) -> SamplerState:
    step = state.step
    if progress is not None:
      jax.debug.callback(progress, step, max_steps)
    k_guide, k_update, k_heun = jax.random.split(jax.random.fold_in(loop_key, step), 3)
    active = jnp.any(state.levels > 0, axis=token_axes)
    pred, calls = denoise(state.z, state.levels, k_guide)
    token_variance = None
    if pred.variance is not None:
      token_variance = tokens_mean(pred.variance, patch_size)
    elif plan.needs_variance or x0_draw != "mean":
      what = type(plan).__name__ if plan.needs_variance else f"x0_draw={x0_draw!r}"
      raise ValueError(f"{what} reads the predicted uncertainty, but the denoiser returned no "
                       "variance: use a model with an uncertainty head (a Prediction with "
                       "`variance`)")
    proposed, plan_state = plan.next_levels(step, state.levels, token_variance, known_mask,
                                            state.plan_state)
    nxt = jnp.clip(proposed.astype(jnp.float32), 0.0, state.levels)
    nxt = jnp.where(known_mask | (step >= max_steps - 1), 0.0, nxt)
    calls = jnp.asarray(calls, jnp.int32)
    nfe, nfe_ex = state.nfe + calls, state.nfe_per_example + active * calls
    if update == "ancestral":
      noise = jax.random.normal(k_update, x_shape, jnp.float32)
      z = updates_lib.ancestral_step(
          state.z, state.levels, nxt, pred.x0, noise, schedule=schedule, patch_size=patch_size,
          x0_variance=pred.variance if x0_draw == "every" else None)
    elif update == "ddim":
      z = updates_lib.ddim_step(state.z, state.levels, nxt, pred.x0, schedule=schedule,
                                patch_size=patch_size)
    else:
      def corrector_denoise(z_, levels_):
        return denoise(jnp.where(mask_full, known, z_), levels_, k_heun)

      z, calls2, needed = updates_lib.heun_step(state.z, state.levels, nxt, pred,
                                                corrector_denoise, schedule=schedule,
                                                patch_size=patch_size)
      nfe, nfe_ex = nfe + calls2, nfe_ex + needed * calls2
    if x0_draw == "last":
      # Tokens jumping to 0 draw from the predicted posterior instead of returning its mean.
      jump = expand_levels(((nxt == 0) & (state.levels > 0)).astype(jnp.float32), x_shape,
                           patch_size) > 0
      noise = jax.random.normal(jax.random.fold_in(k_update, 1), x_shape, jnp.float32)
      z = jnp.where(jump, pred.x0 + jnp.sqrt(pred.variance) * noise, z)
    z = jnp.where(mask_full, known, z)
    level_history = state.level_history
    if level_history is not None:
      level_history = level_history.at[step + 1].set(nxt)
    return SamplerState(step=step + 1, z=z, levels=nxt, plan_state=plan_state, nfe=nfe,
                        nfe_per_example=nfe_ex, level_history=level_history)

  def cond(state: SamplerState) -> Array:
    return (state.step < max_steps) & jnp.any(state.levels > 0)

  state = SamplerState(step=jnp.zeros((), jnp.int32), z=z, levels=levels,
                       plan_state=plan.init(known_mask), nfe=jnp.zeros((), jnp.int32),
                       nfe_per_example=jnp.zeros((x_shape[0],), jnp.int32),
                       level_history=history)
  state = jax.lax.while_loop(cond, body, state)
  info = {"nfe": state.nfe, "nfe_per_example": state.nfe_per_example, "num_steps": state.step}
  if return_levels:
    info["levels"] = state.level_history
  return state.z, info


def sample(denoiser: Denoiser, rng: Array, x_shape: Sequence[int], *,
           schedule: Schedule | str, strategy: str | plans_lib.Plan = "uniform",
           num_steps: int | None = None, patch_size: PatchSize = 1,
           known: Array | None = None, known_mask: Array | None = None,
           input_guidance: float | Array = 0.0, guidance_level: float = DEFAULT_GUIDANCE_LEVEL,
           stochastic: bool = True, update: str | None = None, x0_draw: str = "mean",
           return_levels: bool = False,
           progress: Callable[[int, int], None] | None = None,
           **strategy_kwargs) -> tuple[Array, dict[str, Array]]:
  """Draws samples of shape `x_shape = [B, *spatial, C]` with per-token noise levels.

  Args:
    denoiser: `denoiser(z, t) -> x0_hat | Prediction` (the core protocol; CFG lives inside).
    rng: a PRNG key; the only source of randomness.
    x_shape: the shape of the samples.
    schedule: the training schedule (or its name).
    strategy: 'uniform', 'adaptive' (kwargs `rule='budget'`, the only rule, and
      `adaptive.BudgetPlan`'s own), 'autoregressive' (`order='raster'|'spiral'|'certainty'`,
      `steps_per_group`, `overlap`, `group_shape`; with `num_steps` and `steps_per_group` but
      no `overlap`, the overlap that fits them), 'repaint' (`jump_length=10`,
      `resample=10`), or a `plans.Plan`. Inpainting is any strategy with `known_mask`.
    num_steps: the plan's steps (uniform, adaptive), total steps
      (autoregressive, or give `steps_per_group`) or base steps before jumps (repaint).
    patch_size: token size along each spatial axis.
    known: clean values `[B, *spatial, C]` (batch 1 broadcasts), read only where known.
    known_mask: token-level bool `[B, *spatial/p]` (or broadcastable), True = known. Known
      tokens stay at level 0 with their values and come out bit-exact. Nothing known is plain
      generation; everything known returns `known` with nfe = 0.
    input_guidance: ω ≥ 0; > 0 needs `known_mask` and doubles the calls (see
      `input_guidance.py`). A Python 0 skips the guided branch; an array (e.g. traced, so one
      compiled program serves every ω) always runs it, and ω = 0 then equals no guidance.
    guidance_level: k, the level the context is re-noised to in the guidance branch (0.5).
    stochastic: picks the default update: 'ancestral' (True) or 'ddim' (False).
    update: 'ancestral', 'ddim' or 'heun' (overrides `stochastic`).
    x0_draw: 'mean' (the updates use x̂0), 'last' (a token reaching level 0 is drawn from
      N(x̂0, v), v the uncertainty head's variance) or 'every' (ancestral steps integrate x over
      N(x̂0, v)); not for 'repaint'.
    return_levels: also return the level-map trajectory.
    progress: optional `progress(step, max_steps)`, called from the device each step (a host
      callback: for progress bars only).

  Returns:
    (samples `[B, *spatial, C]` float32, info) with info 'nfe' (int32: denoiser calls, each on
    the whole batch; input guidance makes 2 per evaluation, Heun adds the corrector's; a CFG
    denoiser's internal passes are not counted separately), 'nfe_per_example' (`[B]`: calls
    made while the example still had noisy tokens), 'num_steps' (loop iterations), and with
    `return_levels` 'levels' `[max_steps + 1, B, *grid]` (rows past 'num_steps' are 0).
  """
  if isinstance(schedule, str):
    schedule = get_schedule(schedule)
  x_shape = tuple(int(d) for d in x_shape)
  grid = token_grid(x_shape, patch_size)
  update = update if update is not None else ("ancestral" if stochastic else "ddim")
  updates_lib.check_update(update)
  check_x0_draw(x0_draw, update)
  if num_steps is not None and (int(num_steps) != num_steps or num_steps < 1):
    raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
  guided = _guidance_on(input_guidance)
  if guided and known_mask is None:
    raise ValueError("input_guidance > 0 guides toward known context: pass known and known_mask")
  known_arr, mask = prepare_known(x_shape, known, known_mask, patch_size)
  call = checked_call(denoiser)

  if strategy == "repaint":
    _check_kwargs("strategy 'repaint'", strategy_kwargs, _STRATEGY_KWARGS["repaint"])
    if guided:
      raise ValueError("input guidance needs clean context, which RePaint does not keep: use "
                       "another strategy")
    if x0_draw != "mean":
      raise ValueError(f"x0_draw={x0_draw!r} is for plans; RePaint uses x̂0: pass 'mean'")
    return repaint.sample_repaint(call, rng, x_shape, schedule=schedule,
                                  num_steps=_require_steps("repaint", num_steps),
                                  patch_size=patch_size, known=known_arr, known_mask=mask,
                                  update=update, return_levels=return_levels, **strategy_kwargs)

  plan = make_plan(strategy, grid[1:], num_steps, schedule=schedule, **strategy_kwargs)
  if guided:
    scale = (float(input_guidance) if isinstance(input_guidance, int | float)
             else jnp.asarray(input_guidance, jnp.float32))
    denoise = input_guided(call, known_arr, mask, scale=scale,
                           level=float(guidance_level), schedule=schedule, patch_size=patch_size)
  else:
    def denoise(z, levels, key):
      del key
      return call(z, levels), jnp.int32(1)
  return run_plan(denoise, plan, rng, x_shape, schedule=schedule, patch_size=patch_size,
                  known=known_arr, known_mask=mask, update=update, x0_draw=x0_draw,
                  return_levels=return_levels, progress=progress)
