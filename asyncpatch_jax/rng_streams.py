"""The named random streams of a run. Each stream's root key is `fold_in(key(config.seed),
stream)`, so one seed reproduces a run, and training, evaluation and sampling never share noise
(changing a value here changes every result drawn from that stream)."""

from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
  INIT = 0x1A17  # parameter initialisation
  TRAIN = 0x57E9  # per-step training draws: levels, noise, dropout
  EVAL = 0xE7A1  # evaluation: levels, noise and ELBO strata of the eval split
  FID_SAMPLES = 0xF1D  # the samples that FID / KID score (`--mode=eval`)
  SAMPLE_GRIDS = 0x5A31E  # the trainer's periodic sample and inpainting grids
  SAMPLE = 0x5A3C11  # `--mode=sample`
  INPAINT = 0x1A9A17  # `--mode=inpaint`


def root_key(seed: int, stream: Stream) -> jax.Array:
  """The root key of `stream` for a run seeded with `seed`."""
  return jax.random.fold_in(jax.random.key(int(seed)), int(stream))
