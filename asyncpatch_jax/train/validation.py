"""Checks of a run's config, devices and workdir, before anything is compiled.

Each check raises `ConfigError` with a message that names the field and the fix, so a bad
command line fails in a second rather than after minutes of compilation (or on a pod, after the
job was scheduled).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from etils import epath

from asyncpatch_jax import diffusion
from asyncpatch_jax.autoencoder import VAE_CONFIGS
from asyncpatch_jax.autoencoder.named import RANDOM_WEIGHTS
from asyncpatch_jax.data import preparation, sources
from asyncpatch_jax.diffusion import level_samplers, paths
from asyncpatch_jax.models import common as model_common
from asyncpatch_jax.models import dit as model_dit
from asyncpatch_jax.models import embeddings as model_embeddings
from asyncpatch_jax.models import precision as model_precision
from asyncpatch_jax.models import registry as model_registry
from asyncpatch_jax.sampling import adaptive as sampling_adaptive
from asyncpatch_jax.sampling import masks
from asyncpatch_jax.sampling import plans as sampling_plans
from asyncpatch_jax.sampling import sampler as sampler_lib
from asyncpatch_jax.sampling import updates as sampling_updates
from asyncpatch_jax.train import builders, file_paths
from asyncpatch_jax.train import defaults as defaults_lib
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib

REQUIRED_SECTIONS = ("model", "diffusion", "data", "optimizer", "mesh", "checkpoint", "logging",
                     "eval", "sampling")


class ConfigError(ValueError):
  """A config field, the device topology or the workdir does not allow the run."""


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate_config(config: Any) -> None:
  """Value checks that do not depend on the devices (structure is locked by the configs)."""
  missing = [s for s in REQUIRED_SECTIONS if s not in config]
  _require(not missing, f"config lacks the sections {missing}; build it from configs/base.py")
  _validate_fields(config)
  _require(int(config.num_steps) > 0, f"num_steps must be positive, got {config.num_steps}")
  _require(float(config.train_minutes) >= 0,
           f"train_minutes must be >= 0 (0 = run num_steps), got {config.train_minutes}")

  data = config.data
  _require(data.source in sources.SOURCES,
           f"data.source must be one of {sources.SOURCES}, got {data.source!r}")
  _require(data.source != "tfds" or bool(data.tfds_name),
           "data.source='tfds' needs data.tfds_name (e.g. 'cifar10')")
  _require(int(data.image_size) > 0, f"data.image_size must be positive, got {data.image_size}")
  _require(int(data.channels) in (1, 3), f"data.channels must be 1 or 3, got {data.channels}")
  _require(int(data.batch_size) > 0, f"data.batch_size must be positive, got {data.batch_size}")
  _require(data.crop in ("center", "resize"),
           f"data.crop must be 'center' or 'resize', got {data.crop!r}")
  _require(int(data.worker_count) >= 0 and int(data.read_threads) >= 1,
           "data.worker_count must be >= 0 and data.read_threads >= 1")

  diff = config.diffusion
  try:
    diffusion.get_schedule(diff.schedule, log_snr_min=diff.log_snr_min,
                           log_snr_max=diff.log_snr_max)
    level_samplers.from_config(diff.level_sampler)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.diffusion: {e}") from e
  patch = int(diff.patch_size)
  latents = sources.latent_data(data)
  if latents:
    _validate_latents(config)  # before the patch check, which needs the latent size
  size = builders.data_shape(config)[0]
  what = "the latent size" if latents else "data.image_size"
  _require(patch >= 1 and size % patch == 0,
           f"diffusion.patch_size={diff.patch_size} must divide {what}={size}")
  _require(not diff.weighting or diff.weighting in diffusion.WEIGHTINGS,
           f"diffusion.weighting must be '' or one of {diffusion.WEIGHTINGS}, got "
           f"{diff.weighting!r}")
  _require(float(diff.variance_weight) >= 0, "diffusion.variance_weight must be >= 0")

  model = config.model
  _require(model.parametrization in diffusion.PARAMETRIZATIONS,
           f"model.parametrization must be one of {diffusion.PARAMETRIZATIONS}, got "
           f"{model.parametrization!r}")
  num_classes = int(model.num_classes)
  if num_classes:
    _require(num_classes == int(data.num_classes),
             f"model.num_classes={num_classes} but the data has data.num_classes="
             f"{data.num_classes}; set model.num_classes to 0 (unconditional) or to "
             f"{data.num_classes}")
    _require(data.source != "tfds" or bool(data.label_key),
             "a class-conditional model needs labels: set data.label_key")
    _require(0.0 <= float(model.label_dropout) < 1.0,
             f"model.label_dropout must lie in [0, 1), got {model.label_dropout}")

  if config.get("init_from"):
    _validate_init_from(config)

  opt = config.optimizer
  _require(float(opt.learning_rate) > 0, "optimizer.learning_rate must be positive")
  _require(opt.schedule in opt_lib.SCHEDULES,
           f"optimizer.schedule must be one of {opt_lib.SCHEDULES}, got {opt.schedule!r}")
  _require(int(opt.grad_accum_steps) >= 1, "optimizer.grad_accum_steps must be >= 1")
  _require(int(opt.warmup_steps) >= 0, "optimizer.warmup_steps must be >= 0")
  decays = tuple(opt.ema_decays)
  _require(len(decays) > 0 and all(0.0 < float(d) < 1.0 for d in decays),
           f"optimizer.ema_decays must be a non-empty tuple of decays in (0, 1), got {decays}")
  try:
    names = opt_lib.ema_names(decays)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  sampling = config.sampling
  _require(not sampling.ema or sampling.ema in names,
           f"sampling.ema={sampling.ema!r} is not one of the EMAs {names} (or '' for the first)")
  _require(int(sampling.num_steps) >= 1 and int(sampling.num_samples) >= 1,
           "sampling.num_steps and sampling.num_samples must be positive")
  _require(sampling.inpaint_mask in masks.MASKS,
           f"sampling.inpaint_mask must be one of {sorted(masks.MASKS)}, got "
           f"{sampling.inpaint_mask!r}")
  _require(float(sampling.cfg_scale) == 0.0 or num_classes > 0,
           "sampling.cfg_scale needs a class-conditional model (model.num_classes > 0)")
  try:
    sampling_adaptive.check_rule(sampling.adaptive.rule)
  except ValueError as e:
    raise ConfigError(f"config.sampling.adaptive.rule: {e}") from e
  try:
    options = {**sampler_lib.strategy_kwargs(sampling.strategy, sampling),
               "x0_draw": sampling.x0_draw}
  except ValueError as e:
    raise ConfigError(f"sampling.{sampling.strategy}: {e}") from e
  _require(bool(config.model.uncertainty)
           or not sampler_lib.needs_uncertainty(sampling.strategy, options),
           f"sampling.strategy={sampling.strategy!r} with options {options} reads the uncertainty "
           "head's variance, but model.uncertainty=False: set model.uncertainty=True (and "
           "train with it) or pick a strategy without it ('uniform', 'autoregressive' with "
           "order raster / spiral, x0_draw=mean)")

  _require(not config.eval.get("compare_workdir") or int(config.eval.elbo_steps) > 0,
           "eval.compare_workdir compares bits/dim: set eval.elbo_steps > 0 (e.g. 16)")

  ckpt = config.checkpoint
  _require(int(ckpt.every_steps) > 0, "checkpoint.every_steps must be positive")
  _require(int(ckpt.max_to_keep) >= 0 and int(ckpt.keep_period) >= 0,
           "checkpoint.max_to_keep and checkpoint.keep_period must be >= 0")
  _require(int(config.logging.log_every_steps) > 0, "logging.log_every_steps must be positive")
  for rule in config.mesh.rules:
    _require(len(rule) == 2, f"mesh.rules entries are (regex, spec) pairs, got {rule!r}")
  if data.source == "latents":  # last: the files, once every value is known to be right
    missing = preparation.missing_preparation(config)
    _require(missing is None, str(missing))


def _validate_latents(config: Any) -> None:
  """A latent-diffusion run (a latent cache, or synthetic latents): its VAE fields, and the
  sampler and evaluation settings that assume pixels."""
  _require("vae" in config, "data.source='latents' needs the config.vae section (configs/base.py)")
  vae, data = config.vae, config.data
  _require(vae.name in VAE_CONFIGS,
           f"vae.name must be one of {sorted(VAE_CONFIGS)} for data.source='latents', got "
           f"{vae.name!r}")
  _require(vae.weights != RANDOM_WEIGHTS or vae.name == "tiny",
           "vae.weights='random' is for the 'tiny' debug VAE only; pass the SD VAE's "
           "safetensors file")
  _require(float(vae.scaling_factor) > 0, "vae.scaling_factor must be positive")
  factor = VAE_CONFIGS[vae.name].downsample_factor
  _require(int(data.image_size) % factor == 0,
           f"data.image_size={data.image_size} must be a multiple of the VAE's factor {factor}")
  _require(not config.sampling.clip_x0,
           "sampling.clip_x0 clips x̂0 to the pixel range [-1, 1]; scaled latents are not "
           "bounded there: set sampling.clip_x0=False for data.source='latents'")
  _require(int(config.eval.elbo_steps) == 0,
           "eval.elbo_steps (bits/dim with the 8-bit pixel decoder) is undefined on latents; "
           "set it to 0 for data.source='latents'")
  _require(data.source != "synthetic" or int(config.eval.fid_samples) == 0,
           "eval.fid_samples: FID compares decoded samples with real images, which synthetic "
           "latents lack; set it to 0 for data.source='synthetic' (or use a pixel config)")


def _validate_init_from(config: Any) -> None:
  """`init_from`: DiT weights, read into our DiT where it computes DiT's function
  (models/dit_weights.py checks the file's names and shapes when it is read)."""
  model, path = config.model, str(config.init_from)
  _require(model.name == "dit" and model.dit.adaln == "block",
           f"init_from={path!r} holds DiT weights, which fit our DiT with DiT's adaLN: set "
           f"model.name='dit' and model.dit.adaln='block' (got {model.name!r}, "
           f"{model.dit.adaln!r})")
  _require(model.level_embedding == "dit",
           f"init_from: DiT's timestep embedder was trained on DiT's timesteps; set "
           f"model.level_embedding='dit' (got {model.level_embedding!r})")
  _require(model.parametrization == "eps",
           f"init_from: DiT predicts ε; set model.parametrization='eps' (got "
           f"{model.parametrization!r})")
  _require(epath.Path(path).is_file(),
           f"init_from={path!r} is not a file; download a released DiT (e.g. "
           f"https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt) or pass a checkpoint "
           f"written by DiT's train.py")


def validate_topology(config: Any, devices: list[jax.Device] | None = None) -> tuple[int, int]:
  """Mesh shape vs devices, and the global batch vs the batch-splitting axes."""
  devices = jax.devices() if devices is None else devices
  try:
    data, fsdp = mesh_lib.mesh_shape(config.mesh, len(devices))
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  num = data * fsdp
  batch, accum = int(config.data.batch_size), int(config.optimizer.grad_accum_steps)
  _require(batch % num == 0,
           f"data.batch_size={batch} (global) is not divisible by the {num} devices of the "
           f"mesh (data={data} × fsdp={fsdp}); use a multiple of {num}")
  _require(batch % (accum * num) == 0,
           f"data.batch_size={batch} split into optimizer.grad_accum_steps={accum} microbatches "
           f"does not give every one of the {num} devices the same rows; use a multiple of "
           f"{accum * num}")
  procs = jax.process_count()
  _require(batch % procs == 0,
           f"data.batch_size={batch} is not divisible by the {procs} processes")
  return data, fsdp


def check_workdir(workdir: str | epath.Path) -> epath.Path:
  """Creates `workdir` if needed and proves it writable (each process probes its own file).
  Returns it absolute (a relative one against the current directory; URLs as they are)."""
  if not str(workdir):
    raise ConfigError("--workdir is required")
  path = epath.Path(file_paths.absolute(str(workdir)))
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{jax.process_index()}_{uuid.uuid4().hex[:8]}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {str(path)!r} is not writable: {e}") from e
  return path


def describe_mesh(data: int, fsdp: int) -> str:
  return f"mesh data={data} × fsdp={fsdp} = {math.prod((data, fsdp))} devices"


# A field's type is its default's (train/defaults.py); the locked config enforces it on every
# override, and `_validate_fields` checks it again for a config built some other way, where it
# also refuses a bool for a number and NaN / inf. What a type cannot say is below: one row per
# range rule, (path, test, what the value must be).
_INT, _FLOAT, _BOOL, _STR = "an integer", "a number", "True or False", "a string"
_KINDS = {bool: _BOOL, int: _INT, float: _FLOAT, str: _STR}
# Not type-checked from the defaults: a config may swap the level sampler for another one
# (level_samplers.from_config checks it); the autoregressive group shape is an int, a tuple or a
# name (plans.AutoregressivePlan checks it).
_UNTYPED = ("diffusion.level_sampler", "sampling.autoregressive.group_shape")


_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("num_steps", lambda v: v > 0, "positive"),
    ("train_minutes", lambda v: v >= 0, ">= 0 (0: run num_steps)"),
    ("data.image_size", lambda v: v > 0, "positive"),
    ("data.channels", lambda v: v in (1, 3), "1 or 3"),
    ("data.num_classes", lambda v: v >= 0, ">= 0"),
    ("data.batch_size", lambda v: v > 0, "positive (the global batch)"),
    ("data.seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("data.train_split", bool, "non-empty (e.g. 'train')"),
    ("data.eval_split", bool, "non-empty (e.g. 'test')"),
    ("data.texture_crops_per_epoch", lambda v: v >= 1, ">= 1"),
    ("data.texture_scale", lambda v: v > 0, "positive"),
    ("data.read_threads", lambda v: v >= 1, ">= 1"),
    ("data.prefetch_buffer_size", lambda v: v >= 0, ">= 0"),
    ("data.worker_count", lambda v: v >= 0, ">= 0 (0: read in this process)"),
    ("data.worker_buffer_size", lambda v: v >= 1, ">= 1"),
    ("data.max_bad_records", lambda v: v >= 0, ">= 0 (0: stop at the first bad image)"),
    ("diffusion.patch_size", lambda v: v >= 1, ">= 1"),
    ("diffusion.variance_weight", lambda v: v >= 0, ">= 0"),
    ("model.name", lambda v: v in model_registry.MODELS,
     f"one of {sorted(model_registry.MODELS)}"),
    ("model.num_classes", lambda v: v >= 0, ">= 0 (0: unconditional)"),
    ("model.label_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.level_embedding", lambda v: v in model_embeddings.LEVEL_EMBEDDINGS,
     f"one of {model_embeddings.LEVEL_EMBEDDINGS}"),
    ("model.level_slots", lambda v: v >= 0, ">= 0 (0: off)"),
    ("model.dtype", lambda v: v in model_common.DTYPES, f"one of {model_common.DTYPES}"),
    ("model.remat", lambda v: not v or v in model_common.REMAT_POLICIES,
     f"'' (off) or one of {sorted(model_common.REMAT_POLICIES)}"),
    ("model.kernels", lambda v: v in model_precision.KERNELS,
     f"one of {model_precision.KERNELS}"),
    ("model.unet.channels", lambda v: v >= 1, ">= 1"),
    ("model.unet.num_res_blocks", lambda v: v >= 1, ">= 1"),
    ("model.unet.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.unet.num_heads", lambda v: v >= 1, ">= 1"),
    ("model.unet.norm_groups", lambda v: v >= 1, ">= 1"),
    ("model.dit.size", lambda v: v in model_registry.DIT_SIZES,
     f"one of {list(model_registry.DIT_SIZES)}"),
    ("model.dit.patch", lambda v: v >= 1, ">= 1"),
    ("model.dit.mlp_ratio", lambda v: v > 0, "positive"),
    ("model.dit.adaln", lambda v: v in model_dit.ADALN_KINDS, f"one of {model_dit.ADALN_KINDS}"),
    ("optimizer.name", lambda v: v == "adamw", "'adamw' (the only one provided)"),
    ("optimizer.learning_rate", lambda v: v > 0, "positive"),
    ("optimizer.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optimizer.schedule", lambda v: v in opt_lib.SCHEDULES, f"one of {opt_lib.SCHEDULES}"),
    ("optimizer.end_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.eps", lambda v: v > 0, "positive"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optimizer.grad_clip_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("optimizer.grad_accum_steps", lambda v: v >= 1, ">= 1"),
    ("optimizer.skip_nonfinite_updates", lambda v: v >= 0,
     ">= 0 (0: stop at the first non-finite loss)"),
    ("mesh.data", lambda v: v == -1 or v >= 1, "-1 (fill) or >= 1"),
    ("mesh.fsdp", lambda v: v == -1 or v >= 1, "-1 (fill) or >= 1"),
    ("mesh.min_shard_size", lambda v: v >= 0, ">= 0"),
    ("checkpoint.every_steps", lambda v: v > 0, "positive"),
    ("checkpoint.max_to_keep", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("checkpoint.keep_period", lambda v: v >= 0, ">= 0 (0: none)"),
    ("logging.log_every_steps", lambda v: v > 0, "positive"),
    ("logging.peak_tflops", lambda v: v >= 0, ">= 0 (0: from the device table)"),
    ("eval.every_steps", lambda v: v >= 0, ">= 0 (0: never during training)"),
    ("eval.num_batches", lambda v: v >= 1, ">= 1"),
    ("eval.elbo_steps", lambda v: v >= 0, ">= 0 (0: no bits/dim)"),
    ("eval.paths", lambda v: isinstance(v, tuple | list) and 0 < len(v)
     and all(isinstance(n, str) and n in paths.NAMES for n in v),
     f"a non-empty tuple of names from {paths.NAMES}, e.g. ('homogeneous', 'raster')"),
    ("eval.fid_samples", lambda v: v >= 0, ">= 0 (0: no FID)"),
    ("eval.fid_batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.fid_split", bool, "non-empty (e.g. 'train')"),
    ("eval.fid_reference", lambda v: not v or v.endswith(".npz"),
     "'' (the statistics of eval.fid_split) or an ADM reference batch .npz"),
    ("eval.compare_step", lambda v: v >= 0, ">= 0 (0: the latest checkpoint)"),
    ("sampling.every_steps", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("sampling.num_samples", lambda v: v >= 1, ">= 1"),
    ("sampling.num_steps", lambda v: v >= 1, ">= 1"),
    ("sampling.strategy", lambda v: v in sampler_lib.STRATEGIES,
     f"one of {sampler_lib.STRATEGIES}"),
    ("sampling.x0_draw", lambda v: v in sampler_lib.X0_DRAWS, f"one of {sampler_lib.X0_DRAWS}"),
    ("sampling.update_rule", lambda v: v is None or v in sampling_updates.UPDATES,
     f"None (from sampling.stochastic) or one of {sampling_updates.UPDATES}"),
    ("sampling.autoregressive.order", lambda v: v in sampling_plans.ORDERS,
     f"one of {sampling_plans.ORDERS}"),
    ("sampling.cfg_scale", lambda v: v >= 0, ">= 0 (0: no guidance)"),
    ("sampling.input_guidance", lambda v: v >= 0, ">= 0 (0: off)"),
    ("sampling.num_inpaint", lambda v: v >= 0, ">= 0 (0: no inpainting grid)"),
)


def _has_type(value: Any, kind: str) -> bool:
  if kind == _BOOL:
    return isinstance(value, bool)
  if kind == _INT:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind == _FLOAT:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
  return isinstance(value, str)


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
  node = config
  for key in path.split("."):
    if key not in node:
      return False, None
    node = node[key]
  return True, node


def _typed_leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
  """(path, kind) of every bool / int / float / str field of `tree` (a ConfigDict)."""
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if path in _UNTYPED:
      continue
    if isinstance(value, ml_collections.ConfigDict):
      yield from _typed_leaves(value, f"{path}.")
    elif type(value) in _KINDS:
      yield path, _KINDS[type(value)]


def _validate_fields(config: Any) -> None:
  """Every scalar field's type (its default's) and the `_RANGES`, then the structured ones:
  tuples, the schedule's range, the network's widths vs heads and groups."""
  requirements = {path: requirement for path, _, requirement in _RANGES}
  for path, kind in _typed_leaves(defaults_lib.defaults()):
    present, value = _lookup(config, path)
    if not present:
      continue  # absent from this config: the section checks (or the builder) cover it
    requirement = requirements.get(path)
    _require(_has_type(value, kind),
             f"config.{path} must be {kind}{' ' + requirement if requirement else ''}, got "
             f"{value!r} ({type(value).__name__}); fix it in the config or with "
             f"--config.{path}=...")
  for path, test, requirement in _RANGES:
    present, value = _lookup(config, path)
    _require(not present or bool(test(value)),
             f"config.{path} must be {requirement}, got {value!r}; fix it in the config or with "
             f"--config.{path}=...")

  diff, model = config.diffusion, config.model
  _require(float(diff.log_snr_min) < float(diff.log_snr_max),
           f"diffusion.log_snr_min={diff.log_snr_min} must be below diffusion.log_snr_max="
           f"{diff.log_snr_max}")
  unet = model.unet
  _require(_is_int_tuple(unet.channel_mult, minimum=1) and len(unet.channel_mult) > 0,
           f"model.unet.channel_mult must be a non-empty tuple of integers >= 1, got "
           f"{unet.channel_mult!r}")
  _require(_is_int_tuple(unet.attention_resolutions, minimum=1),
           f"model.unet.attention_resolutions must be a tuple of spatial sizes >= 1, got "
           f"{unet.attention_resolutions!r}")
  decays = config.optimizer.ema_decays
  _require(isinstance(decays, tuple | list) and len(decays) > 0
           and all(_has_type(d, _FLOAT) and 0 < d < 1 for d in decays),
           f"optimizer.ema_decays must be a non-empty tuple of decays in (0, 1), got {decays!r}")
  for key in ("hidden_size", "depth", "num_heads"):
    value = model.dit[key]
    _require(value is None or (_has_type(value, _INT) and value >= 1),
             f"model.dit.{key} must be None (the value of model.dit.size) or an integer >= 1, "
             f"got {value!r}")
  _require(model.get("attention_impl") in (None, "xla", "cudnn"),
           f"model.attention_impl must be None (automatic), 'xla' or 'cudnn', got "
           f"{model.get('attention_impl')!r}")
  if model.get("attention_impl") == "cudnn":
    backend = jax.default_backend()
    _require(backend == "gpu",
             f"model.attention_impl='cudnn' needs a GPU, but JAX's backend is {backend!r}; use "
             f"None (automatic: cuDNN on GPUs where it applies) or 'xla'")
    _require(model.dtype == "bfloat16",
             f"model.attention_impl='cudnn' runs bf16 attention only; set "
             f"model.dtype='bfloat16', or model.attention_impl to None or 'xla' "
             f"(model.dtype={model.dtype!r})")
  if model.name == "unet":
    unet = model.unet
    widths = [int(unet.channels) * int(m) for m in unet.channel_mult]
    _require(all(w % int(unet.norm_groups) == 0 for w in widths),
             f"the U-Net widths {widths} (model.unet.channels × model.unet.channel_mult) must be "
             f"multiples of model.unet.norm_groups={unet.norm_groups}; change either")
  elif model.name == "dit":
    hidden, _, heads = model_registry.dit_dimensions(model.dit)
    _require(hidden % heads == 0 and hidden % 4 == 0,
             f"the DiT hidden size {hidden} must be a multiple of 4 and of its {heads} heads; set "
             f"model.dit.hidden_size / model.dit.num_heads (or model.dit.size)")
    size, patch = int(config.data.image_size), int(model.dit.patch)
    _require(sources.latent_data(config.data) or size % patch == 0,
             f"model.dit.patch={patch} must divide data.image_size={size}")
  level_sampler = config.diffusion.level_sampler
  if level_sampler.get("name") == "mixture":
    weights = {k: c.get("weight", 1.0) for k, c in dict(level_sampler.components).items()}
    _require(all(_has_type(w, _FLOAT) and w >= 0 for w in weights.values())
             and sum(weights.values()) > 0,
             f"diffusion.level_sampler component weights must be numbers >= 0 with a positive "
             f"sum, got {weights}")


def _is_int_tuple(value: Any, minimum: int) -> bool:
  return isinstance(value, tuple | list) and all(
      _has_type(v, _INT) and v >= minimum for v in value)
