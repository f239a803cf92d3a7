"""Latent caches for latent diffusion (encode once, train on the VAE's latents) and the LSUN
LMDB reader. Build a cache with `python -m asyncpatch_jax.latents.build`; `prepare` says what a
run with `data.source='latents'` needs and prints the commands that prepare it."""

from asyncpatch_jax.latents.cache import (
    LatentCacheMismatchError,
    LatentCacheNotFoundError,
    LatentCacheSource,
    LatentPreprocess,
    build_latent_cache,
    check_metadata,
    data_mesh,
    read_metadata,
    vae_identity,
)
from asyncpatch_jax.latents.lsun import ImageTooSmallError, LsunSource

__all__ = [
    "ImageTooSmallError",
    "LatentCacheMismatchError",
    "LatentCacheNotFoundError",
    "LatentCacheSource",
    "LatentPreprocess",
    "LsunSource",
    "build_latent_cache",
    "check_metadata",
    "data_mesh",
    "read_metadata",
    "vae_identity",
]
