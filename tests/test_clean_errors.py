"""User errors (bad config, missing data, weights or checkpoint) end a command line with one
`FATAL:` line and status 2, writing nothing; bugs keep their traceback (`user_errors.py`)."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import user_errors  # noqa: E402
from asyncpatch_jax.train import restore, validation  # noqa: E402


@pytest.mark.parametrize("name", sorted(user_errors.USER_ERRORS))
def test_every_user_error_names_an_exception_class(name):
  module, _, cls = name.rpartition(".")
  assert issubclass(getattr(importlib.import_module(module), cls), Exception)


def _run(error, monkeypatch, env=None):
  monkeypatch.delenv(user_errors.TRACEBACK_ENV, raising=False)
  if env is not None:
    monkeypatch.setenv(user_errors.TRACEBACK_ENV, env)
  with user_errors.clean_exit():
    raise error


def test_user_error_prints_its_message_and_exits_2(monkeypatch, capsys):
  with pytest.raises(SystemExit) as exit_:
    _run(validation.ConfigError("data.batch_size must be positive"), monkeypatch)
  assert exit_.value.code == user_errors.EXIT_STATUS == 2
  assert capsys.readouterr().err == "FATAL: data.batch_size must be positive\n"
  with pytest.raises(SystemExit):  # a subclass of a listed type counts too
    _run(restore.IncompatibleCheckpointError("trained with another model"), monkeypatch)


def test_bugs_and_asked_for_tracebacks_propagate(monkeypatch):
  with pytest.raises(ValueError, match="a bug"):  # a plain ValueError is not a user error
    _run(ValueError("a bug"), monkeypatch)
  with pytest.raises(validation.ConfigError):
    _run(validation.ConfigError("bad"), monkeypatch, env="1")


def _main(tmp_path, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop(user_errors.TRACEBACK_ENV, None)
  return subprocess.run([sys.executable, "-m", "asyncpatch_jax.main", *args,
                         f"--workdir={tmp_path / 'run'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/digits.py", "--config.optimizer.learning_rate=-1"],
     "FATAL: config.optimizer.learning_rate must be positive"),
    (["--config=configs/digits.py:fast"],
     "FATAL: flag --config=configs/digits.py:fast: Error whilst parsing config file: ValueError: "
     "unknown config argument(s) ['fast']"),
], ids=["bad_value", "bad_config_argument"])
def test_bad_config_exits_2_with_one_message_and_writes_nothing(tmp_path, args, message):
  result = _main(tmp_path, *args)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  fatal = [line for line in result.stderr.splitlines() if "FATAL" in line]
  assert len(fatal) == 1 and fatal[0].startswith(message), result.stderr
  assert not (tmp_path / "run").exists()
