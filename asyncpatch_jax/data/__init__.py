"""Input pipelines through grain: bundled in-memory sources, TFDS ArrayRecord sets, latent caches
and synthetic records.

The grain pipeline (`data.pipeline`) is imported on first use, so that code needing only the
sources' shapes (`train.builders.data_shape`, hence the train step) does not load grain.
"""

import importlib
from typing import Any

from asyncpatch_jax.data.preprocess import Preprocess, center_crop_resize
from asyncpatch_jax.data.sources import (
    BUNDLED,
    DatasetNotFoundError,
    SyntheticSource,
    get_source,
    latent_data,
)

_PIPELINE = ("Pipeline", "ProcessRows", "create_eval_pipeline", "create_train_pipeline",
             "process_rows", "reference_images")


def __getattr__(name: str) -> Any:
  if name in _PIPELINE:
    return getattr(importlib.import_module("asyncpatch_jax.data.pipeline"), name)
  raise AttributeError(f"module 'asyncpatch_jax.data' has no attribute {name!r}")


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
]
