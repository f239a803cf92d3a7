"""The networks: the paper's U-Net (spatial FiLM from the level map) and a per-token-adaLN DiT.

A model is an `nnx.Module` called as `model(z, t, labels=None, *, deterministic=True)` and
returns a `ModelOutput(output, log_variance)`: the prediction in the configured parametrisation
and, with the uncertainty head, the per-element log of the predicted squared error of x̂0.
Models never compute a loss; `make_denoiser` turns one into the core's denoiser protocol.
"""

from asyncpatch_jax.models.common import ModelOutput, num_params
from asyncpatch_jax.models.denoiser import make_denoiser
from asyncpatch_jax.models.dit import DIT_SIZES, DiT
from asyncpatch_jax.models.embeddings import (
    LEVEL_EMBEDDINGS,
    ClassEmbedding,
    LevelEmbedding,
    drop_labels,
    sinusoidal_embedding,
)
from asyncpatch_jax.models.registry import MODELS, default_config, dit_dimensions, get_model
from asyncpatch_jax.models.slots import LevelSlots, find_level_slots
from asyncpatch_jax.models.unet import UNet

__all__ = [
    "DIT_SIZES",
    "LEVEL_EMBEDDINGS",
    "MODELS",
    "ClassEmbedding",
    "DiT",
    "LevelEmbedding",
    "LevelSlots",
    "ModelOutput",
    "UNet",
    "default_config",
    "dit_dimensions",
    "drop_labels",
    "find_level_slots",
    "get_model",
    "make_denoiser",
    "num_params",
    "sinusoidal_embedding",
]
