"""Input pipelines through grain: bundled in-memory sources, TFDS ArrayRecord sets, latent caches
and synthetic records."""

from asyncpatch_jax.data.pipeline import (
    Pipeline,
    ProcessRows,
    create_eval_pipeline,
    create_train_pipeline,
    process_rows,
    reference_images,
    to_model_range,
)
from asyncpatch_jax.data.preprocess import Preprocess, center_crop_resize
from asyncpatch_jax.data.sources import (
    BUNDLED,
    DatasetNotFoundError,
    SyntheticSource,
    get_source,
    latent_data,
)

__all__ = [
    "BUNDLED",
    "DatasetNotFoundError",
    "Pipeline",
    "Preprocess",
    "ProcessRows",
    "SyntheticSource",
    "center_crop_resize",
    "create_eval_pipeline",
    "create_train_pipeline",
    "get_source",
    "latent_data",
    "process_rows",
    "reference_images",
    "to_model_range",
]
