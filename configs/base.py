"""The base config: every field at its default (`asyncpatch_jax/train/defaults.py`), locked;
dataset configs (`mnist.py`, `cifar10.py`, …) override what they need.

Usage: `python -m asyncpatch_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR
[--config.a.b=value]`. The returned config is locked: a typo in a dataset config or on the
command line is an error, not a silently ignored field. ARGS are comma-separated words: `debug`
shrinks any config to run on a laptop CPU in seconds (tiny network, batch 8, a few steps); a
config may accept its own words too (`configs/imagenet.py:unet,debug`), listed in its docstring.
"""

from __future__ import annotations

import ml_collections

from asyncpatch_jax.train import defaults

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
  return finalize(defaults.defaults(), arg)


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
