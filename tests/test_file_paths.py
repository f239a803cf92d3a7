"""Relative paths on the command line: resolved once at start-up (issue 16: a relative --workdir
broke the first checkpoint save, and every README command uses one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncpatch_jax.train import file_paths
from configs import digits

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_makes_paths_absolute_and_leaves_names_and_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = digits.get_config("debug")
  config.sampling.output_dir = "outs"
  config.sampling.image = "digits/*.png"
  config.sampling.mask = "half"                  # a mask name, not a file
  config.vae.weights = "random"                  # a name, not a file
  config.data.latent_dir = "gs://bucket/latents"  # URLs stay URLs
  config.eval.fid_cache_dir = "~/fid"
  config, workdir, changed = file_paths.resolve(config, "runs/a")
  assert workdir == str(tmp_path / "runs" / "a")
  assert config.sampling.output_dir == str(tmp_path / "outs")
  assert config.sampling.image == str(tmp_path / "digits" / "*.png")
  assert config.eval.fid_cache_dir == os.path.expanduser("~/fid")
  assert (config.sampling.mask, config.vae.weights) == ("half", "random")
  assert config.data.latent_dir == "gs://bucket/latents"
  assert config.data.tfds_data_dir == ""        # unset stays unset
  assert changed["--workdir"] == ("runs/a", workdir)
  assert set(changed) == {"--workdir", "sampling.output_dir", "sampling.image",
                          "eval.fid_cache_dir"}
  config.sampling.mask = "mask.png"              # a file name is a path
  assert file_paths.resolve(config, "/abs")[0].sampling.mask == str(tmp_path / "mask.png")


def test_every_path_field_exists_in_the_base_config():
  config = digits.get_config()
  for dotted in file_paths.PATH_FIELDS:
    node = config
    for name in dotted.split("."):
      node = node[name]
    assert isinstance(node, str), dotted


def _main(cwd: Path, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, "-m", "asyncpatch_jax.main",
       f"--config={ROOT / 'configs' / 'digits.py'}:debug", "--workdir=runs/digits",
       "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=False", *args],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_relative_workdir_trains_resumes_and_samples(tmp_path):
  """The README's shape of command, run from another directory: save, resume, sample."""
  _main(tmp_path)
  workdir = tmp_path / "runs" / "digits"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert (workdir / "samples_latest.png").is_file()
  resumed = _main(tmp_path, "--config.num_steps=6")
  assert "(resumed)" in resumed.stderr
  assert f"workdir: {workdir}" in resumed.stderr  # the resolved path is logged
  _main(tmp_path, "--mode=sample", "--config.sampling.output_dir=outs",
        "--config.sampling.num_samples=4")
  assert list((tmp_path / "outs").glob("sample_*/samples.png"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
