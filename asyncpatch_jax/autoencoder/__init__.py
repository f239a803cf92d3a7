"""Stable Diffusion's KL autoencoder (SD-VAE) in Flax NNX and its public weights, for latent
diffusion at 256² and above (ImageNet, LSUN)."""

from asyncpatch_jax.autoencoder.vae import (
    SD_VAE,
    VAE_CONFIGS,
    AutoencoderKL,
    LatentDistribution,
    VAEConfig,
    abstract_vae,
    init_vae,
    num_params,
    vae_config,
)
from asyncpatch_jax.autoencoder.weights import (
    HF_FILENAME,
    HF_REPOS,
    WeightsNotFoundError,
    expected_tensors,
    load_vae,
    params_fingerprint,
    read_safetensors,
    save_vae,
    vae_tensors,
    write_safetensors,
)

__all__ = [
    "HF_FILENAME",
    "HF_REPOS",
    "SD_VAE",
    "VAE_CONFIGS",
    "AutoencoderKL",
    "LatentDistribution",
    "VAEConfig",
    "WeightsNotFoundError",
    "abstract_vae",
    "expected_tensors",
    "init_vae",
    "load_vae",
    "num_params",
    "params_fingerprint",
    "read_safetensors",
    "save_vae",
    "vae_config",
    "vae_tensors",
    "write_safetensors",
]
