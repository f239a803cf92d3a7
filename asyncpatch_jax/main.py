r"""The command line: train, sample from, or evaluate an AsyncPatch Diffusion model.

  python -m asyncpatch_jax.main --config=configs/mnist.py --workdir=workdirs/mnist
  python -m asyncpatch_jax.main --config=configs/cifar10.py:debug --workdir=/tmp/c10 \
      --config.optimizer.learning_rate=1e-4
  python -m asyncpatch_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=sample
  python -m asyncpatch_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=inpaint \
      --config.sampling.image=digit.png --config.sampling.mask=mask.png

Multi-host: run the same command on every host. On TPU pods, SLURM and other clusters that JAX
detects, `jax.distributed` initialises itself; elsewhere pass --coordinator_address,
--num_processes and --process_id. Everything else lives in importable libraries.

A bad flag or config, missing data, weights or checkpoint print one `FATAL:` line and exit with
status 2 (`user_errors.py`); `--verbosity=1` or ASYNCPATCH_TRACEBACK=1 adds the traceback.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from asyncpatch_jax import user_errors
from asyncpatch_jax.sampling import adaptive
from asyncpatch_jax.train import file_paths

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run configuration: configs/NAME.py, optionally with :debug.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "inpaint", "eval"],
                          "train (resumes from the workdir); sample or inpaint (sampling.image, "
                          "sampling.mask) from checkpoint sampling.checkpoint_step (0 = the "
                          "latest); eval (the latest checkpoint).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for jax.distributed on clusters "
                                   "JAX does not detect by itself.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _in_cluster() -> bool:
  """True where `jax.distributed.initialize()` can configure itself (several processes)."""
  if any(os.environ.get(k) for k in _CLUSTER_ENV):
    return True
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(key, "1") or 1) > 1:
      return True
  return False


def initialize_distributed() -> None:
  """Guarded `jax.distributed.initialize()`: explicit flags, a detected cluster, or nothing."""
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _in_cluster():
    jax.distributed.initialize()


def _flag_error(error: flags.Error) -> str:
  """The flag error's message; a config file's traceback shrinks to its last line (the error
  itself) unless `user_errors.show_traceback()`."""
  message = str(error)
  head, sep, trace = message.partition("Traceback (most recent call last):")
  if sep and not user_errors.show_traceback():
    lines = [line for line in trace.splitlines() if line.strip()]
    message = f"{head.strip()} {lines[-1].strip() if lines else ''}"
  return f"{message}\nPass --help for the flags."


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a clear message for an override of a config field that doesn't exist
  and for an error in a config file; both exit with status 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    name = str(e).strip("\"'")
    overrides = [a for a in argv if a.startswith("--config.") and name in a] or [
        a for a in argv if a.startswith("--config.")]
    removed = (f"; the adaptive rule {name!r} was removed (issue 18): use "
               f"--config.sampling.adaptive.rule=budget and its options "
               f"--config.sampling.adaptive.budget.*" if name in adaptive.REMOVED_RULES else "")
    user_errors.fail(f"unknown config field {name!r} in {overrides}; every field is defined in "
                     f"asyncpatch_jax/train/defaults.py (and models.default_config() for "
                     f"config.model){removed}")
  except flags.Error as e:
    user_errors.fail(_flag_error(e))


def resolve_paths(config: Any, workdir: str) -> tuple[Any, str]:
  """`--workdir`, the config's path fields and `--jax_compilation_cache_dir` made absolute
  (`train/file_paths.py`), so that no later step depends on the current directory; logged. Bucket
  paths are checked here, before anything compiles (`file_paths.check_urls`)."""
  config, workdir, changed = file_paths.resolve(config, workdir)
  file_paths.check_urls(config, workdir)
  cache_dir = jax.config.jax_compilation_cache_dir
  if cache_dir and file_paths.absolute(cache_dir) != cache_dir:
    jax.config.update("jax_compilation_cache_dir", file_paths.absolute(cache_dir))
    changed["--jax_compilation_cache_dir"] = (cache_dir, file_paths.absolute(cache_dir))
  for name, (given, resolved) in changed.items():
    logging.info("%s=%s resolved to %s", name, given, resolved)
  logging.info("workdir: %s", workdir)
  return config, workdir


@user_errors.clean_exit()
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  initialize_distributed()
  config, workdir = resolve_paths(_CONFIG.value, _WORKDIR.value)
  if config.data.source == "tfds":
    try:  # TFDS may import TensorFlow: keep it off the accelerators JAX uses.
      import tensorflow as tf
      tf.config.set_visible_devices([], "GPU")
    except ImportError:
      pass
  logging.info("JAX process %d / %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  # Each mode imports its job here, not at the top: start-up then loads only what the mode runs
  # (training loads CLU's writers and TensorFlow; sampling needs neither the trainer nor FID).
  if _MODE.value == "train":
    from asyncpatch_jax.train import trainer
    trainer.train_and_evaluate(config, workdir)
  elif _MODE.value == "sample":
    from asyncpatch_jax.train import sample_job
    sample_job.sample_from_checkpoint(config, workdir)
  elif _MODE.value == "inpaint":
    from asyncpatch_jax.train import sample_job
    sample_job.inpaint_from_checkpoint(config, workdir)
  else:
    from asyncpatch_jax.train import eval_job
    eval_job.evaluate(config, workdir)

if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)
