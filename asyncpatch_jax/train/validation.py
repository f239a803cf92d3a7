"""Checks of a run's config, devices and workdir, before anything is compiled.

Each check raises `ConfigError` with a message that names the field and the fix, so a bad
command line fails in a second rather than after minutes of compilation (or on a pod, after the
job was scheduled).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import jax
from etils import epath

from asyncpatch_jax import diffusion
from asyncpatch_jax.autoencoder import VAE_CONFIGS
from asyncpatch_jax.data import sources
from asyncpatch_jax.diffusion import level_samplers
from asyncpatch_jax.latents import prepare
from asyncpatch_jax.sampling import masks
from asyncpatch_jax.train import mesh as mesh_lib
from asyncpatch_jax.train import optimizer as opt_lib
from asyncpatch_jax.train import state as state_lib

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
  except ValueError as e:
    raise ConfigError(f"config.diffusion: {e}") from e
  patch = int(diff.patch_size)
  if data.source == "latents":
    _validate_latents(config)  # before the patch check, which needs the latent size
  size = state_lib.data_shape(config)[0]
  what = "the latent size" if data.source == "latents" else "data.image_size"
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

  ckpt = config.checkpoint
  _require(int(ckpt.every_steps) > 0, "checkpoint.every_steps must be positive")
  _require(int(ckpt.max_to_keep) >= 0 and int(ckpt.keep_period) >= 0,
           "checkpoint.max_to_keep and checkpoint.keep_period must be >= 0")
  _require(int(config.logging.log_every_steps) > 0, "logging.log_every_steps must be positive")
  for rule in config.mesh.rules:
    _require(len(rule) == 2, f"mesh.rules entries are (regex, spec) pairs, got {rule!r}")
  if data.source == "latents":  # last: the files, once every value is known to be right
    missing = prepare.missing_preparation(config)
    _require(missing is None, str(missing))


def _validate_latents(config: Any) -> None:
  """A latent-diffusion run: its VAE fields, and the sampler and evaluation settings that
  assume pixels."""
  _require("vae" in config, "data.source='latents' needs the config.vae section (configs/base.py)")
  vae, data = config.vae, config.data
  _require(vae.name in VAE_CONFIGS,
           f"vae.name must be one of {sorted(VAE_CONFIGS)}, got {vae.name!r}")
  _require(vae.weights != prepare.RANDOM_WEIGHTS or vae.name == "tiny",
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
  _require(int(config.eval.get("fid_samples", 0)) == 0,
           "eval.fid_samples: FID of a latent run needs decoded samples, which evaluation does "
           "not do; set it to 0 for data.source='latents'")


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
  """Creates `workdir` if needed and proves it writable (each process probes its own file)."""
  if not str(workdir):
    raise ConfigError("--workdir is required")
  path = epath.Path(workdir)
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
