"""AdamW with linear warmup and cosine / constant decay, gradient clipping, and parameter EMAs.

Weight decay applies to matrices and kernels only (ndim ≥ 2), not to biases, norms or
embeddings' scalars. EMAs are kept for several decays at once (`optimizer.ema_decays`), each
under the name `ema_name(decay)` ("0.999" → "0p999", safe as a checkpoint key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(opt_config: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay (to `end_lr_fraction`) or flat."""
  lr = float(opt_config.learning_rate)
  warmup = int(opt_config.warmup_steps)
  if opt_config.schedule not in SCHEDULES:
    raise ValueError(f"unknown optimizer.schedule {opt_config.schedule!r}; choose one of "
                     f"{SCHEDULES}")
  if opt_config.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, decay_steps=max(1, int(num_steps) - warmup),
                                        alpha=float(opt_config.end_lr_fraction))
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(opt_config: Any, num_steps: int) -> optax.GradientTransformation:
  """Clip by global norm (if `grad_clip_norm` > 0), then AdamW on the schedule."""
  if opt_config.name != "adamw":
    raise ValueError(f"unknown optimizer.name {opt_config.name!r}; only 'adamw' is provided")
  parts = []
  if opt_config.grad_clip_norm and opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(opt_config, num_steps),
                           b1=float(opt_config.b1), b2=float(opt_config.b2),
                           eps=float(opt_config.eps),
                           weight_decay=float(opt_config.weight_decay), mask=_decay_mask))
  return optax.chain(*parts)


def ema_name(decay: float) -> str:
  return f"{float(decay):g}".replace(".", "p")


def ema_names(decays: Sequence[float]) -> tuple[str, ...]:
  names = tuple(ema_name(d) for d in decays)
  if len(set(names)) != len(names):
    raise ValueError(f"optimizer.ema_decays has duplicates: {tuple(decays)}")
  return names


def ema_decay(decay: float, step: jax.Array, warmup: bool) -> jax.Array:
  """The decay used at `step` (the count of updates so far, before this one).

  With warmup the average starts short and grows, min(decay, (1 + step) / (10 + step)), so an
  early EMA is not dominated by the random initialisation.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: dict[str, Any], params: Any, step: jax.Array, decays: Sequence[float],
               warmup: bool) -> dict[str, Any]:
  """ema ← d·ema + (1 − d)·params for every configured decay."""
  out = {}
  for decay in decays:
    name = ema_name(decay)
    d = ema_decay(decay, step, warmup)
    out[name] = jax.tree.map(lambda e, p, d=d: (d * e + (1.0 - d) * p).astype(e.dtype),
                             ema[name], params)
  return out
