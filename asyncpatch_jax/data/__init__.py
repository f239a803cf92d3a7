"""Input pipelines: bundled in-memory sources and TFDS ArrayRecord sets through grain."""

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
    get_source,
)

__all__ = [
    "BUNDLED",
    "DatasetNotFoundError",
    "Pipeline",
    "Preprocess",
    "ProcessRows",
    "center_crop_resize",
    "create_eval_pipeline",
    "create_train_pipeline",
    "get_source",
    "process_rows",
    "reference_images",
    "to_model_range",
]
