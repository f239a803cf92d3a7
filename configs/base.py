"""Defaults for every run; dataset configs (`mnist.py`, `cifar10.py`, …) override them.

Usage: `python -m asyncpatch_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR
[--config.a.b=value]`. The returned config is locked: a typo in a dataset config or on the
command line is an error, not a silently ignored field. ARGS are comma-separated words: `debug`
shrinks any config to run on a laptop CPU in seconds (tiny network, batch 8, a few steps); a
config may accept its own words too (`configs/imagenet.py:unet,debug`), listed in its docstring.
"""

from __future__ import annotations

import ml_collections

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import level_samplers

ARGS = ("debug",)


def parse_arg(arg: str | None, choices: tuple[str, ...] = ARGS) -> set[str]:
  """`'unet,debug'` → {'unet', 'debug'}; '' / None → {}. A word not in `choices` (the config's
  own words and 'debug') is an error naming the choices."""
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  unknown = sorted(words - set(choices))
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}; choose from {choices}")
  return words


def pick_variant(words: set[str], variants: tuple[str, ...]) -> str:
  """The one word of `variants` in `words`, or the first variant (the default) if none."""
  chosen = sorted(words & set(variants))
  if len(chosen) > 1:
    raise ValueError(f"config arguments {chosen} exclude each other; choose one of {variants}")
  return chosen[0] if chosen else variants[0]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The base defaults, locked (a 32×32 RGB TFDS set is the nominal data; set its name)."""
  return finalize(defaults(), arg)


def defaults() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 400_000          # optimizer updates (also the LR schedule's horizon)
  config.train_minutes = 0.0          # wall-clock training budget; 0 = run num_steps
  # A DiT checkpoint (facebookresearch/DiT's DiT-XL-2-256x256.pt, or one its train.py wrote)
  # whose (EMA) weights start a fresh run; optimizer, EMAs and step start fresh. Needs
  # model.name='dit', dit.adaln='block', level_embedding='dit', parametrization='eps' (README,
  # "Fine-tuning DiT-XL/2"). A run that resumes from its own checkpoint ignores it.
  config.init_from = ""

  config.model = models.default_config()

  config.diffusion = ml_collections.ConfigDict({
      "schedule": "cosine",
      "log_snr_min": -15.0,
      "log_snr_max": 15.0,
      "patch_size": 1,                # level-map token size p: one noise level per p×p patch
      "weighting": "",                # '' = the parametrisation's own MSE; or eps/x0/v/elbo
      "variance_weight": 0.01,        # the uncertainty head's NLL factor
  })
  config.diffusion.level_sampler = level_samplers.default_config()

  config.data = ml_collections.ConfigDict({
      "source": "tfds",               # mnist | digits | textures | tfds | latents | synthetic
      # 'synthetic': random records of the run's shape (VAE latents when vae.name is set),
      # labels included, for plumbing and speed tests without the data set (data/sources.py).
      # 'latents': VAE latents of the images, cached per split in <latent_dir>/<split> by
      # `python -m asyncpatch_jax.latents.build` (config.vae names the VAE; image_size is the
      # pixel resolution that was encoded). The images came from TFDS (tfds_name) or from the
      # LSUN LMDB exports <lsun_dir>/<lsun_category>_{train,val}_lmdb.
      "latent_dir": "",
      "lsun_dir": "",
      "lsun_category": "",            # e.g. 'church_outdoor', 'bedroom'; '' = TFDS images
      "tfds_name": "",
      "tfds_data_dir": "",            # '' = TFDS's default ($TFDS_DATA_DIR, ~/tensorflow_datasets)
      "label_key": "label",           # '' for unlabelled sets
      "train_split": "train",
      "eval_split": "test",
      "image_size": 32,
      "channels": 3,
      "num_classes": 0,               # classes in the data (model.num_classes uses them)
      "batch_size": 128,              # global batch, split over every device of the mesh
      "crop": "center",               # 'center': ADM centre crop + resize; 'resize': squash
      "random_flip": True,
      "seed": 0,                      # shuffling and flips
      "texture_crops_per_epoch": 10_000,
      "texture_scale": 1.0,
      "read_threads": 4,
      "prefetch_buffer_size": 8,      # batches buffered by the reading threads
      # grain worker processes (0: read in this process). The saved iterator state depends on
      # it: resume a run with the value it was started with.
      "worker_count": 0,
      "worker_buffer_size": 2,
      # TFDS sets: how many unreadable / unusable images (corrupt, empty, 5 channels, …) may be
      # replaced by the next record, each with a warning, before the run stops. 0: stop at one.
      "max_bad_records": 0,
  })

  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw",
      "learning_rate": 1e-4,
      "warmup_steps": 1_000,
      "schedule": "constant",         # constant | cosine (to end_lr_fraction at num_steps)
      "end_lr_fraction": 0.0,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "weight_decay": 0.0,
      "grad_clip_norm": 1.0,          # 0 disables clipping
      "grad_accum_steps": 1,          # microbatches per update (the batch is split k ways)
      "ema_decays": (0.9999,),        # one EMA copy of the parameters per decay
      "ema_warmup": True,             # decay min(d, (1 + n) / (10 + n)) early on
      # > 0: a step whose loss or gradient is NaN / inf keeps the old parameters, optimizer
      # state and EMAs (counted in train/nonfinite_steps); the run stops once more than this
      # many were skipped since it (re)started. 0: stop at the first one.
      "skip_nonfinite_updates": 0,
  })

  config.mesh = ml_collections.ConfigDict({
      "data": -1,                     # -1: all devices not used by the other axis
      "fsdp": 1,
      "min_shard_size": 2**16,        # smaller parameters stay replicated
      # Ordered (regex on the parameter path, spec) pairs; spec 'fsdp', 'replicate' or a tuple.
      "rules": (("(^|/)(kernel|embedding)$", "fsdp"), (".*", "replicate")),
  })

  config.checkpoint = ml_collections.ConfigDict({
      "every_steps": 5_000,
      "max_to_keep": 3,
      "keep_period": 50_000,          # also keep every K-th step (0: none)
      "async_save": True,
  })

  config.logging = ml_collections.ConfigDict({
      "log_every_steps": 100,
      "profile": False,               # capture a CLU profile (TensorBoard) after warm-up
      "parameter_overview": True,
      # Peak TFLOP/s per device for the logged MFU; 0: from train/perf.py's device table
      # (accelerators; on CPUs and unknown devices no MFU is logged).
      "peak_tflops": 0.0,
  })

  config.eval = ml_collections.ConfigDict({
      "every_steps": 10_000,          # 0: never during training
      "num_batches": 8,               # global batches of the eval split per evaluation
      "elbo_steps": 0,                # > 0: also bits/dim along each of `paths`
      "paths": "homogeneous",         # comma-separated: homogeneous, raster, random
      # --mode=eval's FID protocol, set per config (README, "FID protocols"): this many samples
      # (0: no FID) from config.sampling's sampler, steps and cfg_scale, against
      "fid_samples": 0,
      "fid_batch_size": 64,           # samples drawn (and Inception batches) at a time
      "fid_split": "train",           # the statistics of this split, or when set
      # an ADM reference batch's (.npz with mu, sigma: VIRTUAL_imagenet256_labeled.npz, …)
      "fid_reference": "",
      "fid_export": False,            # also save the samples in ADM's format (evaluation/adm.py)
      "fid_cache_dir": "",            # '' = <workdir>/fid_cache
      # --mode=eval: the paired bits/dim difference (same x0, s, noise) against a checkpoint of
      # the same model in that workdir ('' = none; may be --workdir itself, at another step).
      "compare_workdir": "",
      "compare_step": 0,              # its checkpoint (0 = the latest)
  })

  config.vae = ml_collections.ConfigDict({  # the autoencoder of data.source='latents'
      # '': pixel space; 'sd': Stable Diffusion's VAE; 'tiny': debug runs
      "name": "",
      # The diffusers safetensors file (stabilityai/sd-vae-ft-ema's
      # diffusion_pytorch_model.safetensors); 'random': seeded random weights ('tiny' only).
      "weights": "",
      "scaling_factor": 0.18215,      # latents are scaled by it (unit variance for the SD VAE)
      "dtype": "float32",             # the VAE's compute dtype when decoding samples
      "decode_batch_size": 16,        # latents decoded at a time for sample grids
  })
  # Linked to vae.name (one value): the data are its latents (source 'latents' or 'synthetic').
  config.data.vae_name = config.vae.get_ref("name")

  config.sampling = ml_collections.ConfigDict({
      "every_steps": 20_000,          # sample + inpainting grids (0: only at the end)
      "num_samples": 64,
      "num_steps": 250,
      "strategy": "uniform",
      "stochastic": True,             # ancestral updates (False: DDIM / probability flow)
      "clip_x0": True,                # clip the denoiser's x̂0 to the data range [-1, 1]
      "cfg_scale": 0.0,
      "input_guidance": 0.0,
      "inpaint_mask": "half",         # the known region of the inpainting grid
      "num_inpaint": 16,
      "ema": "",                      # which EMA to sample from ('' = the first decay)
      # --mode=sample / inpaint (README, "Sampling"):
      "strategy_options": "",         # the strategy's keywords, e.g. 'rule=quantile,speedup=3'
      "checkpoint_step": 0,           # the checkpoint to read (0 = the latest)
      "batch_size": 0,                # samples per compiled call (0 = num_samples at once)
      "output_dir": "",               # '' = <workdir>/samples; each run gets a fresh folder
      "image": "",                    # --mode=inpaint: a PNG / JPEG, a folder or a glob
      "mask": "",                     # a PNG (white = known) or a mask name ('' = inpaint_mask)
      "mask_invert": False,           # the PNG is white = hole (LaMa's convention)
  })
  return config


def apply_debug(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to run on a CPU in seconds: tiny network, batch 8, a few steps."""
  config.num_steps = 4
  config.train_minutes = 0.0
  config.model.unet.update(channels=16, channel_mult=(1,), num_res_blocks=1,
                           attention_resolutions=(), norm_groups=8, num_heads=2, dropout=0.0)
  config.model.dit.update(hidden_size=32, depth=2, num_heads=2)
  config.model.level_slots = 0
  config.data.batch_size = 8
  config.data.image_size = min(config.data.image_size, 16)
  config.data.read_threads = 1
  config.data.prefetch_buffer_size = 2
  config.data.worker_count = 0
  config.data.texture_crops_per_epoch = 64
  config.optimizer.warmup_steps = 2
  config.checkpoint.every_steps = 2
  config.checkpoint.keep_period = 0
  config.logging.log_every_steps = 1
  config.logging.parameter_overview = False
  config.eval.every_steps = 0
  config.eval.num_batches = 1
  config.sampling.every_steps = 0
  config.sampling.num_samples = 4
  config.sampling.num_steps = 2
  config.sampling.num_inpaint = 2
  config.eval.fid_samples = 0         # FID only when asked for (--config.eval.fid_samples=N)
  config.eval.fid_reference = ""
  if config.data.source == "latents":  # a random 'tiny' VAE; 32² images give 4×4×4 latents
    config.data.image_size = 32
    config.vae.name = "tiny"
    config.vae.weights = "random"
    config.vae.decode_batch_size = 4
  return config


def finalize(config: ml_collections.ConfigDict, arg: str | None,
             choices: tuple[str, ...] = ARGS) -> ml_collections.ConfigDict:
  """Applies the config argument (e.g. `debug`) and locks the structure against typos.

  Dataset configs start from `get_config()` (already locked: they can change fields, not add
  them) and return `finalize(config, arg, CHOICES)`, so `debug` shrinks their own settings;
  `choices` are the words the config accepts (its own and 'debug').
  """
  if "debug" in parse_arg(arg, choices):
    apply_debug(config)
  config.lock()
  return config
