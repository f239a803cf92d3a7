"""The VAE a config names: an architecture ('sd' or 'tiny') with the weights of a safetensors
file, or seeded random weights for the tiny debug VAE (`RANDOM_WEIGHTS`)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from asyncpatch_jax.autoencoder.vae import AutoencoderKL, VAEConfig, init_vae, vae_config
from asyncpatch_jax.autoencoder.weights import HF_FILENAME, HF_REPOS, load_vae

RANDOM_WEIGHTS = "random"  # `vae.weights`: a seeded random VAE (debug runs and tests only)


def load_named_vae(weights: str, name: str = "sd", *, scaling_factor: float | None = None,
                   dtype: Any = "float32") -> AutoencoderKL:
  """The VAE `name` ('sd' or 'tiny') with the weights of a safetensors file, or `'random'`
  (deterministic random weights, seed 0; only for the 'tiny' architecture)."""
  config = vae_config(name, scaling_factor)
  if weights == RANDOM_WEIGHTS:
    if name != "tiny":
      raise ValueError(f"vae.weights='random' gives meaningless latents; it is allowed for the "
                       f"'tiny' VAE (debug runs), not for {name!r}: pass the {HF_FILENAME} of "
                       f"{HF_REPOS[0]}")
    return init_vae(config, seed=0, dtype=jnp.dtype(dtype))
  return load_vae(weights, config, dtype=jnp.dtype(dtype))


def run_vae_config(config: Any) -> VAEConfig:
  """The architecture and scaling factor of `config.vae`."""
  return vae_config(config.vae.name, float(config.vae.scaling_factor))


def load_run_vae(config: Any) -> AutoencoderKL:
  """The run's VAE (`config.vae`): raises `WeightsNotFoundError` naming the download."""
  vae = config.vae
  return load_named_vae(vae.weights, vae.name, scaling_factor=float(vae.scaling_factor),
                        dtype=vae.dtype)
