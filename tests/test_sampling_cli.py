"""`write_outputs`: what a sampling run leaves behind, written atomically."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax.diffusion import Prediction, get_schedule
from asyncpatch_jax.sampling import masks, sample
from asyncpatch_jax.sampling.cli import write_outputs


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
  assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


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
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
