"""`write_outputs` (what a sampling run leaves behind, written atomically) and the sampling
command line: --mode=sample / inpaint on a two-step checkpoint, `restore_model`, the config check,
bad input, traced guidance weights."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_visualize import assert_not_constant, read_grid

from asyncpatch_jax import pixels
from asyncpatch_jax.diffusion import Prediction, get_schedule
from asyncpatch_jax.sampling import masks, sample
from asyncpatch_jax.train.sample_io import write_outputs


def _run(**kwargs):
  denoiser = lambda z, t: Prediction(0.5 * z, 0.1 + 0.0 * z)
  return jax.jit(functools.partial(
      sample, denoiser, x_shape=(4, 8, 8, 3), schedule=get_schedule("cosine"), patch_size=2,
      return_levels=True, **kwargs))(jax.random.key(0))


def test_writes_grid_npz_settings_and_gif(tmp_path):
  known = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  known_mask = masks.half(4, (4, 4))
  settings = {"strategy": "autoregressive", "steps_per_group": 2, "order": "spiral",
              "checkpoint": "workdir/checkpoints/100", "seed": 0, "mask": "half",
              "grid": (4, 4)}
  samples, info = _run(strategy="autoregressive", steps_per_group=2, order="spiral",
                       known=known, known_mask=known_mask)
  written = write_outputs(samples, info, settings, tmp_path / "out", known=known,
                          known_mask=known_mask)
  assert set(written) == {"grid", "inputs", "npz", "settings", "levels_gif"}
  out = tmp_path / "out"
  record = json.loads((out / "settings.json").read_text())
  assert record["nfe"] == int(info["nfe"]) == 16  # 8 unknown tokens × 2 steps
  assert record["grid"] == [4, 4] and record["checkpoint"] == settings["checkpoint"]
  assert record["loop_steps"] == 16 and record["nfe_per_example_mean"] == 16.0
  with np.load(out / "samples.npz") as data:
    np.testing.assert_array_equal(data["samples"], np.asarray(samples))
    np.testing.assert_array_equal(data["known_mask"], known_mask)
    assert data["levels"].shape == (17, 4, 4, 4)  # trimmed to the steps taken
  with Image.open(out / "levels.gif") as im:
    assert im.n_frames == 17
  with Image.open(out / "samples.png") as im:
    assert im.size == (2 * 10 + 2, 2 * 10 + 2)
  grid = read_grid(out / "samples.png", 4, (8, 8, 3))  # 2 × 2
  np.testing.assert_array_equal(grid, pixels.to_uint8(samples))
  assert_not_constant(grid, "samples")
  inputs = read_grid(out / "inputs.png", 4, (8, 8, 3))
  known_pixels = np.repeat(np.repeat(known_mask, 2, axis=1), 2, axis=2)[..., None]
  np.testing.assert_array_equal(inputs, np.where(known_pixels, pixels.to_uint8(known), 128))
  assert not [f for f in os.listdir(out) if f.startswith(".")]  # file_io temporaries


def test_non_image_samples_skip_the_png_and_odd_settings_are_recorded(tmp_path):
  samples = np.zeros((2, 16, 4), np.float32)  # 1-D latents with 4 channels
  info = {"nfe": np.int32(7), "num_steps": np.int32(7)}
  written = write_outputs(samples, info, {"schedule": object(), "arr": np.arange(2)}, tmp_path)
  assert set(written) == {"npz", "settings"}
  record = json.loads((tmp_path / "settings.json").read_text())
  assert record["nfe"] == 7 and record["arr"] == [0, 1] and "object" in record["schedule"]


def test_a_failure_leaves_no_partial_files(tmp_path, monkeypatch):
  (tmp_path / "samples.npz").write_bytes(b"previous run")

  def broken(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez_compressed", broken)
  with pytest.raises(OSError):
    write_outputs(np.zeros((1, 4, 4, 1)), {"nfe": 1}, {}, tmp_path)
  assert (tmp_path / "samples.npz").read_bytes() == b"previous run"
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # file_io temporaries


# --- main.py --mode=sample / --mode=inpaint on a tiny trained checkpoint ---------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def _config(**sampling):
  from configs import digits

  config = digits.get_config("debug")  # 8×8×1, class-conditional U-Net of 16 channels
  config.num_steps = 2
  config.checkpoint.every_steps = 1
  config.checkpoint.async_save = False
  config.sampling.num_samples = 2
  config.sampling.update(sampling)  # nested: e.g. autoregressive={"group_shape": 4}
  return config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Equal sampling programs (same batch, strategy and steps) are compiled once per module."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = [getattr(jax.config, name) for name in names]
  for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
    jax.config.update(name, value)
  yield
  for name, value in zip(names, old):
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run's directory with checkpoints at steps 1 and 2, saved as the trainer saves them (no
  training: initial parameters, the raw ones moved off the EMA so the two differ)."""
  from asyncpatch_jax.train import checkpoint as ckpt_lib
  from asyncpatch_jax.train import mesh as mesh_lib
  from asyncpatch_jax.train import optimizer as opt_lib
  from asyncpatch_jax.train import state as state_lib
  from asyncpatch_jax.train import workdir as workdir_lib

  path = tmp_path_factory.mktemp("run")
  config = _config()
  setup = state_lib.setup_state(config, mesh_lib.make_mesh(config.mesh),
                                opt_lib.make_optimizer(config.optimizer, config.num_steps))
  state = setup.init(config)
  workdir_lib.write_config(config, path)
  checkpointer = ckpt_lib.Checkpointer(path / "checkpoints", config.checkpoint)
  for step in (1, 2):
    state = state.replace(step=jnp.int32(step),
                          params=jax.tree.map(lambda p, s=step: p + 1e-3 * s, state.params))
    checkpointer.save(step, state, None, config)
  checkpointer.close()
  return path


def _files(folder):
  return sorted(os.listdir(folder))


def test_sample_mode_writes_a_fresh_folder_in_batches(workdir, tmp_path):
  from asyncpatch_jax.train import sample_job

  config = _config(num_samples=5, batch_size=2, num_steps=3, output_dir=str(tmp_path))
  first = sample_job.sample_from_checkpoint(config, workdir)
  second = sample_job.sample_from_checkpoint(config, workdir)
  assert first["folder"] != second["folder"] and first["step"] == 2
  assert _files(tmp_path) == sorted([first["folder"].name, second["folder"].name])
  assert _files(first["folder"]) == ["samples.npz", "samples.png", "settings.json"]
  record = json.loads((first["folder"] / "settings.json").read_text())
  assert record["nfe"] == 3 and record["nfe_per_batch"] == [3, 3, 3]  # uniform: num_steps
  assert record["checkpoint_step"] == 2 and record["num_batches"] == 3
  assert record["sampling"]["num_steps"] == 3 and record["config"]["data"]["source"] == "digits"
  assert record["ema"] == "0p999"
  with np.load(first["folder"] / "samples.npz") as data:
    assert data["samples"].shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(data["samples"], first["samples"])
    np.testing.assert_array_equal(data["nfe_per_example"], [3] * 5)
  assert np.all(np.abs(first["samples"]) <= 1) and len(np.unique(first["samples"][:, 0, 0])) > 1
  grid = read_grid(first["folder"] / "samples.png", 5, (8, 8, 1), nrow=10)  # a column per class
  np.testing.assert_array_equal(grid, pixels.to_uint8(first["samples"]))
  assert_not_constant(grid, "samples")
  np.testing.assert_array_equal(first["samples"], second["samples"])  # seeded


def test_named_step_and_level_gif_for_autoregressive(workdir, tmp_path):
  from asyncpatch_jax.sampling import make_plan
  from asyncpatch_jax.train import sample_job

  config = _config(checkpoint_step=1, strategy="autoregressive", num_steps=8,
                   autoregressive={"group_shape": 4, "overlap": 0.0}, output_dir=str(tmp_path))
  out = sample_job.sample_from_checkpoint(config, workdir)
  assert out["step"] == 1 and "step00000001_autoregressive" in out["folder"].name
  plan = make_plan("autoregressive", (8, 8), 8, schedule="cosine", group_shape=4, overlap=0.0)
  record = json.loads((out["folder"] / "settings.json").read_text())
  assert record["nfe"] == plan.max_steps == 8 and record["checkpoint_step"] == 1
  assert record["strategy"] == "autoregressive" and record["strategy_options"] == {
      "order": "raster", "group_shape": 4, "overlap": 0.0, "x0_draw": "mean", "update": None,
      "guidance_level": 0.5}
  with Image.open(out["folder"] / "levels.gif") as im:
    assert im.n_frames == 9
  config.sampling.checkpoint_step = 7
  with pytest.raises(FileNotFoundError, match=r"step 7 .*saved steps are \[1, 2\]"):
    sample_job.sample_from_checkpoint(config, workdir)


def _write_png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
  return str(path)


@pytest.fixture
def digit_files(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(images):
    _write_png(folder / f"{i}.png", image)
  mask = np.zeros((8, 8), np.uint8)
  mask[:, :5] = 255  # white = known: the left 5 columns
  return images, str(folder), _write_png(tmp_path / "mask.png", mask)


def test_inpaint_mode_keeps_known_pixels_bit_exact(workdir, tmp_path, digit_files):
  from asyncpatch_jax.train import sample_job

  images, folder, mask_png = digit_files
  config = _config(image=folder, mask=mask_png, batch_size=2, num_steps=3,
                   output_dir=str(tmp_path / "out"))
  out = sample_job.inpaint_from_checkpoint(config, workdir)
  assert _files(out["folder"]) == ["inputs.png", "samples.npz", "samples.png", "settings.json"]
  known = images[..., None].astype(np.float32) * (2.0 / 255.0) - 1.0
  with np.load(out["folder"] / "samples.npz") as data:
    samples, saved_known, mask = data["samples"], data["known"], data["known_mask"]
  np.testing.assert_array_equal(saved_known, known)
  assert mask.shape == (3, 8, 8) and mask[:, :, :5].all() and not mask[:, :, 5:].any()
  np.testing.assert_array_equal(samples[:, :, :5], known[:, :, :5])  # bit-exact in [-1, 1]
  assert not np.array_equal(samples[:, :, 5:], known[:, :, 5:])
  grid = read_grid(out["folder"] / "samples.png", 3, (8, 8, 1))  # 2 per row, one cell empty
  np.testing.assert_array_equal(grid, pixels.to_uint8(samples))
  assert_not_constant(grid, "inpainted samples")
  inputs = read_grid(out["folder"] / "inputs.png", 3, (8, 8, 1))
  np.testing.assert_array_equal(inputs[:, :, :5], images[:, :, :5, None])
  assert (inputs[:, :, 5:] == 128).all()  # the hole drawn grey
  record = json.loads((out["folder"] / "settings.json").read_text())
  assert record["nfe"] == 3 and record["mode"] == "inpaint" and len(record["images"]) == 3
  assert record["known_fraction"] == pytest.approx(5 / 8)


def test_inpaint_everything_known_returns_the_images_and_nothing_known_is_an_error(
    workdir, tmp_path, digit_files):
  from asyncpatch_jax.train import sample_job

  images, folder, _ = digit_files
  white = _write_png(tmp_path / "white.png", np.full((8, 8), 255))
  config = _config(image=folder, mask=white, batch_size=2, num_steps=3,
                   output_dir=str(tmp_path / "out"))
  out = sample_job.inpaint_from_checkpoint(config, workdir)
  np.testing.assert_array_equal(out["samples"][..., 0],
                                images.astype(np.float32) * (2.0 / 255.0) - 1.0)
  assert out["info"]["nfe"] == 0
  config.sampling.mask_invert = True  # white = hole: nothing known
  with pytest.raises(ValueError, match="marks nothing as known"):
    sample_job.inpaint_from_checkpoint(config, workdir)


def test_inpaint_bad_inputs_are_clear_errors(tmp_path, digit_files):
  from asyncpatch_jax.train import sample_job

  _, folder, mask_png = digit_files
  # All of these fail before the checkpoint is read (the workdir does not exist).
  bad = tmp_path / "bad"
  bad.mkdir()
  cases = [
      (dict(image=folder, mask=_write_png(bad / "m.png", np.full((5, 5), 255))),
       r"5×5, but the model needs the token grid \(8, 8\)"),
      (dict(image=_write_png(bad / "rgb.png", np.zeros((8, 8, 3))), mask=mask_png),
       "colour image .* takes 1 channel"),
      (dict(image=_write_png(bad / "big.png", np.zeros((16, 16))), mask=mask_png),
       "16×16 but the model takes 8×8"),
      (dict(image=str(tmp_path / "none*.png"), mask=mask_png), "names no PNG"),
      (dict(image=folder, mask="no_such_mask"), "neither a mask image file nor a mask name"),
  ]
  for fields, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      sample_job.inpaint_from_checkpoint(_config(**fields), tmp_path / "missing")
  assert not (tmp_path / "missing").exists()


def test_missing_checkpoint_and_different_model_config_are_clear_errors(workdir, tmp_path):
  from asyncpatch_jax.train import sample_job

  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*train first"):
    sample_job.sample_from_checkpoint(_config(), tmp_path / "empty")
  assert not (tmp_path / "empty").exists()
  config = _config(output_dir=str(tmp_path))
  config.model.unet.channels = 32
  config.diffusion.patch_size = 2
  with pytest.raises(ValueError, match=r"different model config \(diffusion.patch_size: 1 in "
                     r"the checkpoint, 2 now; model.unet.channels: 16 in the checkpoint, 32 now\)"):
    sample_job.sample_from_checkpoint(config, workdir)
  assert _files(tmp_path) == []


def test_restore_model_gives_the_ema_network(workdir):
  from asyncpatch_jax.train import restore

  model, step = restore.restore_model(_config(), workdir)
  raw, _ = restore.restore_model(_config(), workdir, ema="params")
  assert step == 2
  z, t = np.zeros((2, 8, 8, 1), np.float32), np.full((2,), 0.5, np.float32)
  labels = np.array([0, 1], np.int32)
  out = np.asarray(model(z, t, labels, deterministic=True).output)
  assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()
  assert not np.allclose(out, np.asarray(raw(z, t, labels, deterministic=True).output))
  with pytest.raises(ValueError, match=r"no EMA 'x' .*\['0p999'\]"):
    restore.restore_model(_config(), workdir, ema="x")


def test_config_differences_ignore_sampling_and_training_only_fields():
  from asyncpatch_jax.train import restore

  saved = json.loads(_config().to_json_best_effort())
  config = _config(num_steps=9, strategy="adaptive")
  config.model.unet.dropout, config.model.level_slots = 0.3, 0
  config.optimizer.learning_rate, config.optimizer.grad_clip_norm = 1.0, 0.5
  config.data.batch_size = 64
  assert restore.config_differences(saved, config) == {}
  config.optimizer.grad_clip_norm = 0.0  # clipping off changes the optimizer state's tree
  config.model.parametrization = "v"
  assert set(restore.config_differences(saved, config)) == {"optimizer.grad_clip_norm",
                                                            "model.parametrization"}
  del saved["model"]["parametrization"]  # a checkpoint older than a field: not compared
  assert set(restore.config_differences(saved, config)) == {"optimizer.grad_clip_norm"}
  config.model.dit.size = "XL"  # a U-Net reads no model.dit
  assert set(restore.config_differences(saved, config)) == {"optimizer.grad_clip_norm"}
  saved["model"]["channels"] = 16  # a config of the flat layout before model.unet / model.dit
  assert restore.unknown_fields(saved, config) == ["model.channels"]
  with pytest.raises(restore.IncompatibleCheckpointError,
                     match=r"another layout: its fields model.channels do not exist"):
    restore.check_compatible(saved, config, "W")


def test_strategy_options_are_config_fields():
  from asyncpatch_jax.sampling import sampler

  config = _config(strategy="adaptive")
  assert sampler.strategy_kwargs("uniform", config.sampling) == {}
  config.sampling.adaptive.budget.exponent = 2.0
  assert sampler.strategy_kwargs("adaptive", config.sampling) == {
      "rule": "budget", "exponent": 2.0, "max_speedup": 4.0, "reference": "first",
      "data_variance": 1.0, "relative": True}
  config.sampling.autoregressive.group_shape = "row"  # an int, a tuple or a layout name
  assert sampler.strategy_kwargs("autoregressive", config.sampling) == {
      "order": "raster", "group_shape": "row"}
  with pytest.raises(AttributeError, match="exponnt"):  # the locked config refuses a typo
    config.sampling.adaptive.budget.exponnt = 3
  with pytest.raises(TypeError):
    config.sampling.adaptive.budget.exponent = "fast"
  assert set(config.sampling.adaptive) == {"rule", "budget"}  # no sections of removed rules


@pytest.mark.parametrize("rule", ["step_size", "quantile"])
def test_a_removed_adaptive_rule_is_a_clear_error(rule):
  """Issue 18 removed the step-size and quantile rules: the config check, and the sampler's
  options, name the removal and 'budget' instead of taking the name as unknown."""
  from asyncpatch_jax.sampling import sampler
  from asyncpatch_jax.train import validation

  config = _config(strategy="uniform")
  validation.validate_config(config)
  config.sampling.adaptive.rule = rule  # refused whatever the strategy
  match = rf"adaptive\.rule: the adaptive rule '{rule}' was removed .* use rule='budget'"
  with pytest.raises(validation.ConfigError, match=match):
    validation.validate_config(config)
  with pytest.raises(ValueError, match=f"'{rule}' was removed"):
    sampler.strategy_kwargs("adaptive", config.sampling)


@pytest.mark.parametrize("override, message", [
    ("--config.sampling.adaptive.rule=step_size", "the adaptive rule 'step_size' was removed"),
    ("--config.sampling.adaptive.quantile.speedup=3",  # the old rule's own section
     "unknown config field 'quantile'.* the adaptive rule 'quantile' was removed"),
])
def test_an_old_command_line_names_the_removed_rule(tmp_path, override, message):
  import re
  import subprocess

  result = subprocess.run(
      [sys.executable, "-m", "asyncpatch_jax.main", "--config=configs/digits.py:debug",
       f"--workdir={tmp_path / 'w'}", override], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL:")]
  assert len(fatal) == 1 and re.search(message, fatal[0]), result.stderr[-2000:]
  assert re.search(r"rule='?budget", fatal[0]) and "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_traced_input_guidance_compiles_once_and_zero_equals_no_guidance():
  known = np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  mask = masks.half(4, (4, 4))
  # Each token's x̂0 reads the whole image, so re-noising the context changes it.
  denoiser = lambda z, t: Prediction(0.5 * z + 0.3 * jnp.mean(z, axis=(1, 2), keepdims=True),
                                     0.1 + 0.0 * z)

  def run(omega):
    return sample(denoiser, jax.random.key(0), (4, 8, 8, 3), schedule=get_schedule("cosine"),
                  num_steps=4, patch_size=2, known=known, known_mask=mask,
                  input_guidance=omega)

  traced = jax.jit(run)
  a, info_a = traced(jnp.float32(0.0))
  b, info_b = traced(jnp.float32(2.0))
  assert traced._cache_size() == 1
  assert int(info_a["nfe"]) == int(info_b["nfe"]) == 8  # the guided branch: 2 calls a step
  plain, info = jax.jit(functools.partial(run, 0.0))()
  assert int(info["nfe"]) == 4
  np.testing.assert_allclose(np.asarray(a), np.asarray(plain), atol=1e-6)
  assert not np.allclose(np.asarray(b), np.asarray(plain))
  with pytest.raises(ValueError, match=">= 0"):
    run(np.float32(-1.0))


def test_make_sample_fn_traces_the_guidance_weights(workdir):
  from asyncpatch_jax.train import restore
  from asyncpatch_jax.train import samples as samples_lib

  config = _config(num_steps=6)  # (with 2, the untrained x̂0 saturates at ±1 either way)
  # The raw parameters: the EMA's zero-initialised output layer would ignore the context.
  restored = restore.restore_params(config, workdir, ema="params")
  fn = samples_lib.make_sample_fn(config, restored.setup, 2, inpaint=True)
  known = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  mask = masks.half(2, (8, 8))
  outs = [np.asarray(fn(restored.params, restored.model_state, jax.random.key(0), known, mask,
                        guidance=jnp.float32(omega), cfg_scale=jnp.float32(cfg)))
          for omega, cfg in ((0.5, 0.0), (2.0, 0.0), (2.0, 1.5))]
  assert fn._cache_size() == 1  # one program for every ω and CFG scale
  assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])
  for out in outs:
    np.testing.assert_array_equal(out[:, :, :4], known[:, :, :4])


@pytest.mark.parametrize("strategy, options, bad", [
    ("adaptive", {}, True),
    ("autoregressive", {"autoregressive": {"order": "certainty", "steps_per_group": 2}}, True),
    ("uniform", {"x0_draw": "every"}, True),
    ("uniform", {"x0_draw": "mean"}, False),
    ("autoregressive", {"autoregressive": {"order": "spiral", "group_shape": "row"}}, False),
])
def test_strategies_needing_the_uncertainty_head_are_refused_at_start_up(strategy, options, bad):
  from asyncpatch_jax.train import validation

  config = _config(strategy=strategy, **options)
  config.model.uncertainty = False
  if bad:
    with pytest.raises(validation.ConfigError, match=r"model\.uncertainty=False"):
      validation.validate_config(config)
    config.model.uncertainty = True
  validation.validate_config(config)
