"""Clean exits for the command lines: a user error prints its message alone and exits with status
2 (as absl does for a bad flag); a bug keeps its traceback.

User errors are the exceptions whose message already says what is wrong and how to fix it: a bad
config, a data set, latent cache, weights file or checkpoint that is missing or does not fit the
run, a diverged run. `--verbosity=1` (absl) or `ASYNCPATCH_TRACEBACK=1` shows their traceback too.
Used by `asyncpatch_jax.main`, `asyncpatch_jax.latents.build` and the benchmarks:

  with user_errors.clean_exit():
    main()
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

from absl import logging

EXIT_STATUS = 2
TRACEBACK_ENV = "ASYNCPATCH_TRACEBACK"

# By qualified name, so that this module imports nothing heavy (tests check that each exists).
USER_ERRORS = frozenset({
    "asyncpatch_jax.train.validation.ConfigError",
    "asyncpatch_jax.data.sources.DatasetNotFoundError",
    "asyncpatch_jax.data.sources.BadDataError",
    "asyncpatch_jax.data.latent_cache.LatentCacheNotFoundError",
    "asyncpatch_jax.data.latent_cache.LatentCacheMismatchError",
    "asyncpatch_jax.latents.lsun.ImageTooSmallError",
    "asyncpatch_jax.autoencoder.weights.WeightsNotFoundError",
    "asyncpatch_jax.train.checkpoint.CheckpointError",
    "asyncpatch_jax.train.restore.IncompatibleCheckpointError",
    "asyncpatch_jax.train.trainer.NonFiniteError",
    "builtins.FileNotFoundError",  # an input file: a checkpoint, an image, Inception weights
})


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is (a subclass of) one of `USER_ERRORS`."""
  return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(error).__mro__)


def show_traceback() -> bool:
  """`ASYNCPATCH_TRACEBACK` set (not '0'), or absl's `--verbosity` at 1 (debug) or more."""
  return os.environ.get(TRACEBACK_ENV, "0") not in ("", "0") or logging.get_verbosity() >= 1


def fail(message: str) -> NoReturn:
  """Prints `FATAL: message` to stderr and exits with `EXIT_STATUS`."""
  sys.stdout.flush()
  print(f"FATAL: {message}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_STATUS)


@contextlib.contextmanager
def clean_exit() -> Iterator[None]:
  """A user error raised inside ends the program with its message alone (`fail`); anything else
  propagates with its traceback. Also a decorator (`@clean_exit()`)."""
  try:
    yield
  except Exception as error:
    if not is_user_error(error) or show_traceback():
      raise
    fail(str(error) or type(error).__name__)
