"""configs/: every config loads, locks, validates, and `debug` shrinks it; bad input is refused."""

import json
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

from asyncpatch_jax.train import builders, validation  # noqa: E402
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


# Each config with every argument it accepts (besides 'debug').
VARIANTS = [(name, None) for name in DATASETS] + [
    ("imagenet", "unet"), ("imagenet", "pixel64"), ("imagenet", "pixel128"),
    ("lsun", "bedroom"), ("lsun", "dit"), ("lsun", "pixel"), ("lsun", "bedroom,pixel")]


def _with_latents_prepared(config, tmp_path):
  """Points a latent config at a VAE file and complete (empty) caches of every split it reads,
  so validation sees a prepared run."""
  from asyncpatch_jax.autoencoder.named import RANDOM_WEIGHTS
  from asyncpatch_jax.data import latent_cache, preparation

  if config.data.source != "latents":
    return config
  if config.vae.weights != RANDOM_WEIGHTS:
    config.vae.weights = str(tmp_path / "vae.safetensors")
    (tmp_path / "vae.safetensors").write_bytes(b"")
  config.data.latent_dir = str(tmp_path / "latents")
  for split in preparation.needed_splits(config):
    directory = tmp_path / "latents" / split
    directory.mkdir(parents=True)
    (directory / latent_cache.METADATA).write_text(json.dumps({"format": latent_cache.FORMAT,
                                                               "complete": True}))
  return config


@pytest.mark.parametrize("name, variant", VARIANTS)
@pytest.mark.parametrize("debug", [False, True])
def test_dataset_configs_validate(name, variant, debug, tmp_path):
  arg = ",".join(w for w in (variant, "debug" if debug else None) if w)
  config = _with_latents_prepared(CONFIGS[name].get_config(arg), tmp_path)
  validation.validate_config(config)
  assert config.is_locked
  if debug:
    assert config.num_steps <= 10 and config.data.batch_size <= 8
    assert config.model.unet.channels <= 16 and config.model.dit.hidden_size == 32
    assert max(builders.data_shape(config)[:2]) <= 16  # pixels, or the latents of 32² images
    validation.validate_topology(config)  # batch 8 on the 8 test devices


@pytest.mark.parametrize("arg, source, model, shape", [
    (None, "latents", "dit", (32, 32, 4)),
    ("unet", "latents", "unet", (32, 32, 4)),
    ("pixel64", "tfds", "unet", (64, 64, 3)),
    ("pixel128", "tfds", "unet", (128, 128, 3)),
])
def test_imagenet_variants(arg, source, model, shape):
  config = imagenet.get_config(arg)
  assert (config.data.source, config.model.name, builders.data_shape(config)) == (
      source, model, shape)
  assert config.data.batch_size == 256 and config.num_steps == 400_000
  assert config.optimizer.name == "adamw" and config.optimizer.learning_rate == 1e-4
  assert tuple(config.optimizer.ema_decays) == (0.9999,)
  assert config.model.num_classes == 1000 and config.model.label_dropout == 0.1
  assert config.sampling.cfg_scale > 0
  if source == "latents":
    assert config.vae.name == "sd" and not config.sampling.clip_x0
  if model == "dit":
    assert (config.model.dit.size, config.model.dit.patch) == ("XL", 2)


def test_lsun_categories_and_models():
  church, bedroom = lsun.get_config(), lsun.get_config("bedroom,dit")
  assert church.data.lsun_category == "church_outdoor" and church.model.name == "unet"
  assert bedroom.data.lsun_category == "bedroom" and bedroom.model.name == "dit"
  assert church.model.num_classes == 0 and church.data.source == "latents"
  assert lsun.get_config("pixel").data.tfds_name == "lsun/church_outdoor"


@pytest.mark.parametrize("module, arg, match", [
    (imagenet, "dit,unet", "exclude each other"),
    (imagenet, "pixel32", "unknown config argument"),
    (lsun, "church,bedroom", "exclude each other"),
    (lsun, "dit,pixel", "'dit' runs on latents"),
    (mnist, "dit", "unknown config argument"),   # words belong to the config that takes them
])
def test_bad_config_arguments(module, arg, match):
  with pytest.raises(ValueError, match=match):
    module.get_config(arg)


def test_latent_config_checks():
  config = imagenet.get_config("debug")
  config.data.latent_dir = "/nonexistent"
  for field, value, match in [("sampling.clip_x0", True, "clip_x0"),
                              ("eval.elbo_steps", 4, "elbo_steps"),
                              ("vae.name", "sdxl", "vae.name"),
                              ("data.image_size", 36, "VAE's factor 8"),
                              ("diffusion.patch_size", 3, "the latent size=4")]:
    bad = config.copy_and_resolve_references()
    section, _, key = field.rpartition(".")
    bad[section][key] = value
    with pytest.raises(validation.ConfigError, match=match):
      validation.validate_config(bad)
  bad = imagenet.get_config()
  bad.vae.weights = "random"
  with pytest.raises(validation.ConfigError, match="'tiny' debug VAE only"):
    validation.validate_config(bad)


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
