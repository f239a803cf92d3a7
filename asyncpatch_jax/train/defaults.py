"""The defaults of every run's config: its one statement of the fields, their types and values.

`configs/base.py` starts every dataset config from `defaults()` and locks it, so the types set here
hold for every override (`--config.a.b=value`); `train/validation.py` reads the types from here
too, and checks what a type cannot say (ranges, and fields against each other).
"""

from __future__ import annotations

import ml_collections

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import level_samplers
from asyncpatch_jax.sampling import sampler as sampler_lib
from asyncpatch_jax.sampling.input_guidance import DEFAULT_GUIDANCE_LEVEL


def defaults() -> ml_collections.ConfigDict:
  """Every field of a run's config with its default (unlocked; configs/base.py locks it)."""
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
      "paths": ("homogeneous",),      # a tuple of homogeneous, raster, random
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
      # x0_draw: 'mean' (x̂0), 'last' / 'every' (draws with the uncertainty head's variance);
      # update_rule (sample's `update`): None (from stochastic), 'ancestral', 'ddim' or 'heun';
      # guidance_level: the level the context is re-noised to for input guidance
      # (sampling/sampler.py, `sample`).
      "x0_draw": "mean",
      "update_rule": ml_collections.config_dict.placeholder(str),
      "guidance_level": DEFAULT_GUIDANCE_LEVEL,
      # --mode=sample / inpaint (README, "Sampling"):
      "checkpoint_step": 0,           # the checkpoint to read (0 = the latest)
      "batch_size": 0,                # samples per compiled call (0 = num_samples at once)
      "output_dir": "",               # '' = <workdir>/samples; each run gets a fresh folder
      "image": "",                    # --mode=inpaint: a PNG / JPEG, a folder or a glob
      "mask": "",                     # a PNG (white = known) or a mask name ('' = inpaint_mask)
      "mask_invert": False,           # the PNG is white = hole (LaMa's convention)
  })
  # Each strategy's keywords: sampling.adaptive (rule 'budget', and adaptive.budget.*),
  # sampling.autoregressive, sampling.repaint (sampling/sampler.py, `default_config`).
  for strategy, options in sampler_lib.default_config().items():
    config.sampling[strategy] = options
  return config
