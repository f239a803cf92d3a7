"""configs/: every config loads, locks, validates, and `debug` shrinks it; bad input is refused."""

import pathlib
import sys

import jax
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax.train import validation  # noqa: E402
from configs import (  # noqa: E402
  base,
  celeba_hq,
  cifar10,
  digits,
  imagenet,
  lsun,
  mnist,
  textures,
)

CONFIGS = {"base": base, "mnist": mnist, "digits": digits, "textures": textures,
           "cifar10": cifar10, "celeba_hq": celeba_hq, "lsun": lsun, "imagenet": imagenet}
DATASETS = [name for name in CONFIGS if name != "base"]


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("arg", [None, "debug"])
def test_dataset_configs_validate(name, arg):
  config = CONFIGS[name].get_config(arg)
  validation.validate_config(config)
  assert config.is_locked
  if arg == "debug":
    assert config.num_steps <= 10 and config.data.batch_size <= 8
    assert config.data.image_size <= 16 and config.model.channels <= 16
    validation.validate_topology(config)  # batch 8 on the 8 test devices


def test_base_config_needs_a_dataset_name():
  with pytest.raises(validation.ConfigError, match="tfds_name"):
    validation.validate_config(base.get_config())


def test_every_file_in_configs_is_covered():
  files = {p.stem for p in (ROOT / "configs").glob("*.py")} - {"__init__"}
  assert files == set(CONFIGS)


def test_mnist_is_the_bundled_default_with_a_time_budget_field():
  config = mnist.get_config()
  assert config.data.source == "mnist" and config.data.image_size == 32
  assert config.train_minutes == 0.0
  config.train_minutes = 10  # what `make demo` sets on the command line
  assert config.train_minutes == 10.0


def test_locked_configs_refuse_new_fields():
  config = mnist.get_config()
  with pytest.raises(AttributeError):
    config.optimizer.learnin_rate = 1.0  # a typo must not pass silently
  with pytest.raises(AttributeError):
    config.new_section = ml_collections.ConfigDict()


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument"):
    mnist.get_config("debgu")


def _parse(argv):
  fv = flags.FlagValues()
  argv = ["prog", *argv]
  # Override flags (--config.a.b) are defined from the argv given at definition, as in main.py.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_and_unknown_fields():
  path = str(ROOT / "configs" / "digits.py")
  config = _parse([f"--config={path}:debug", "--config.optimizer.learning_rate=0.5",
                   "--config.train_minutes=3"])
  assert config.optimizer.learning_rate == 0.5 and config.train_minutes == 3.0
  assert config.num_steps <= 10  # the :debug argument reached get_config
  with pytest.raises(AttributeError, match="nonexistent"):
    _parse([f"--config={path}", "--config.optimizer.nonexistent=1"])


def test_main_names_an_unknown_override(tmp_path):
  import subprocess

  result = subprocess.run(
      [sys.executable, "-m", "asyncpatch_jax.main", "--config=configs/digits.py:debug",
       f"--workdir={tmp_path}", "--config.optimizer.nonexistent=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "unknown config field 'nonexistent'" in result.stderr
  assert "--config.optimizer.nonexistent=1" in result.stderr
  assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("field, value, match", [
    ("data.source", "mnits", "data.source"),
    ("diffusion.patch_size", 3, "patch_size"),
    ("diffusion.schedule", "cosin", "schedule"),
    ("model.parametrization", "score", "parametrization"),
    ("model.num_classes", 7, "num_classes"),
    ("optimizer.schedule", "linear", "optimizer.schedule"),
    ("optimizer.ema_decays", (0.999, 1.5), "ema_decays"),
    ("sampling.ema", "0p5", "sampling.ema"),
    ("num_steps", 0, "num_steps"),
])
def test_bad_values_are_named(field, value, match):
  config = digits.get_config("debug")
  section, _, key = field.rpartition(".")
  target = config.get(section) if section else config
  target[key] = value
  with pytest.raises(validation.ConfigError, match=match):
    validation.validate_config(config)


def test_unknown_level_sampler_field_is_an_error():
  config = digits.get_config("debug")
  with config.unlocked():
    config.diffusion.level_sampler.components.controlled.kapa = 0.5
  with pytest.raises(validation.ConfigError, match="kapa"):
    validation.validate_config(config)


def test_cfg_needs_a_conditional_model():
  config = mnist.get_config("debug")
  config.model.num_classes = 0
  config.sampling.cfg_scale = 2.0
  with pytest.raises(validation.ConfigError, match="cfg_scale"):
    validation.validate_config(config)


def test_topology_errors():
  n = jax.device_count()
  config = digits.get_config("debug")
  config.data.batch_size = n + 1
  with pytest.raises(validation.ConfigError, match="not divisible by the"):
    validation.validate_topology(config)
  config = digits.get_config("debug")
  config.mesh.data, config.mesh.fsdp = 3, 5
  with pytest.raises(validation.ConfigError, match="does not match"):
    validation.validate_topology(config)
  config = digits.get_config("debug")
  config.mesh.fsdp = 3
  with pytest.raises(validation.ConfigError, match="does not divide"):
    validation.validate_topology(config)
  config = digits.get_config("debug")
  config.optimizer.grad_accum_steps = 2  # batch 8 in 2 microbatches of 4 on 8 devices
  with pytest.raises(validation.ConfigError, match="microbatches"):
    validation.validate_topology(config)
  config = digits.get_config("debug")
  config.mesh.data, config.mesh.fsdp = -1, 2
  assert validation.validate_topology(config) == (n // 2, 2)


def test_workdir_must_be_writable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(validation.ConfigError, match="not writable"):
    validation.check_workdir(blocker / "run")
  assert validation.check_workdir(tmp_path / "new" / "run").exists()
  assert not list((tmp_path / "new" / "run").iterdir())  # the probe is removed
