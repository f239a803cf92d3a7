"""Building latent caches for latent diffusion (encode once, train on the VAE's latents), and the
LSUN LMDB reader they are built from. Build a cache with `python -m asyncpatch_jax.latents.build`;
training reads it through `data.latent_cache`, and `data.preparation` says what a run with
`data.source='latents'` needs and prints the commands that prepare it."""

from asyncpatch_jax.latents.encode import build_latent_cache, data_mesh, make_source, vae_identity
from asyncpatch_jax.latents.lsun import ImageTooSmallError, LsunSource

__all__ = [
    "ImageTooSmallError",
    "LsunSource",
    "build_latent_cache",
    "data_mesh",
    "make_source",
    "vae_identity",
]
