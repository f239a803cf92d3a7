"""What a config builds: the noise schedule, the example shape, the network and its RNG roots.

Pure functions of the config, shared by the train state, the train step, evaluation and
sampling; none of them touches a mesh, an optimizer or a checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from asyncpatch_jax import diffusion, models, rng_streams
from asyncpatch_jax.data import sources as data_sources


def make_schedule(diffusion_config: Any) -> diffusion.Schedule:
  """The noise schedule of `config.diffusion` (its name and log-SNR bounds)."""
  return diffusion.get_schedule(diffusion_config.schedule,
                                log_snr_min=diffusion_config.log_snr_min,
                                log_snr_max=diffusion_config.log_snr_max)


def data_shape(config: Any) -> tuple[int, int, int]:
  """The shape of one example the network sees: the image, or its VAE latent (`[H/8, W/8, 4]`
  for the SD VAE) when the data are latents (`data.sources.latent_data`)."""
  return data_sources.example_shape(config.data)


def build_model(config: Any, rngs: nnx.Rngs) -> nnx.Module:
  """The network for `config.model` on this config's data shape, level patch and schedule."""
  return models.get_model(config.model, data_shape=data_shape(config),
                          level_patch_size=int(config.diffusion.patch_size),
                          schedule=make_schedule(config.diffusion), rngs=rngs)


def model_rngs(key: jax.Array) -> nnx.Rngs:
  """The streams a network is built with: 'params' for initialisation, 'dropout' for training."""
  return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))


def init_key(config: Any) -> jax.Array:
  """The parameter-initialisation key: the run's `Stream.INIT` root."""
  return rng_streams.root_key(config.seed, rng_streams.Stream.INIT)


def train_rng_root(config: Any) -> jax.Array:
  """The root of every training step's randomness (`fold_in(root, step)`): `Stream.TRAIN`."""
  return rng_streams.root_key(config.seed, rng_streams.Stream.TRAIN)
