r"""Encode a data set split into a latent cache once, before latent-diffusion training.

  python -m asyncpatch_jax.latents.build --source=tfds --tfds_name=imagenet2012 --split=train \
      --image_size=256 --vae_weights=PATH/diffusion_pytorch_model.safetensors \
      --out=CACHE/imagenet256/train
  python -m asyncpatch_jax.latents.build --source=lsun \
      --lsun_lmdb=PATH/church_outdoor_train_lmdb --image_size=256 \
      --vae_weights=PATH/diffusion_pytorch_model.safetensors --out=CACHE/church256/train

Interrupted? Run the same command again: complete shards are kept. Multi-host: run it on every
host with --distributed (the batch is split over all devices; process 0 writes). Missing images
or weights print one `FATAL:` line and exit with status 2 (`asyncpatch_jax.user_errors`).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging

from asyncpatch_jax import user_errors
from asyncpatch_jax.autoencoder.named import load_named_vae
from asyncpatch_jax.latents.encode import build_latent_cache, make_source

_SOURCE = flags.DEFINE_enum("source", "tfds", ["tfds", "lsun"], "Where the images come from.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "imagenet2012", "TFDS data set (ArrayRecord).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir ('' = default).")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split.")
_LABEL_KEY = flags.DEFINE_string("label_key", "label", "TFDS label feature ('' = none).")
_LSUN_LMDB = flags.DEFINE_string("lsun_lmdb", "", "LSUN export directory (holds data.mdb).")
_LSUN_SMALL = flags.DEFINE_enum("lsun_small_images", "error", ["error", "skip"],
                                "LSUN images smaller than the crop: fail, or drop them.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Crop size (ADM centre crop + resize).")
_VAE_WEIGHTS = flags.DEFINE_string("vae_weights", None, "SD VAE safetensors file ('random': "
                                   "seeded random weights, --vae_config=tiny only).")
_VAE_CONFIG = flags.DEFINE_enum("vae_config", "sd", ["sd", "tiny"],
                                "VAE architecture: 'sd' (SD-VAE) or 'tiny' (debug runs).")
_VAE_DTYPE = flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"],
                               "The VAE's computation dtype.")
_OUT = flags.DEFINE_string("out", None, "Cache directory (one split).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch (a multiple of devices).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_240, "Examples per ArrayRecord shard.")
_STORAGE_DTYPE = flags.DEFINE_enum("storage_dtype", "float32", ["float32", "float16"],
                                   "dtype of the stored moments (float16 halves the cache).")
_THREADS = flags.DEFINE_integer("num_threads", 16, "Image decoding threads per process.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")


@user_errors.clean_exit()
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:  # TFDS may import TensorFlow (heavy, optional): keep it off the accelerators JAX uses.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  vae = load_named_vae(_VAE_WEIGHTS.value, _VAE_CONFIG.value, dtype=_VAE_DTYPE.value)
  source, name = make_source(
      _SOURCE.value, image_size=_IMAGE_SIZE.value, tfds_name=_TFDS_NAME.value,
      split=_SPLIT.value, tfds_data_dir=_TFDS_DATA_DIR.value, label_key=_LABEL_KEY.value,
      lsun_lmdb=_LSUN_LMDB.value, lsun_small_images=_LSUN_SMALL.value)
  logging.info("encoding %s (%d images) into %s", name, len(source), _OUT.value)
  build_latent_cache(source, vae, _OUT.value, image_size=_IMAGE_SIZE.value,
                     batch_size=_BATCH_SIZE.value, shard_size=_SHARD_SIZE.value,
                     storage_dtype=_STORAGE_DTYPE.value, source_name=name,
                     weights_file=None if _VAE_WEIGHTS.value == "random" else _VAE_WEIGHTS.value,
                     num_threads=_THREADS.value,
                     log=logging.info)


if __name__ == "__main__":
  flags.mark_flags_as_required(["vae_weights", "out"])
  app.run(main)
