"""`--mode=eval`: bits/dim along the homogeneous, raster and random paths, FID / KID against
cached reference statistics, and the JSON it writes."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import evaluation  # noqa: E402
from asyncpatch_jax.diffusion import paths as paths_lib  # noqa: E402
from asyncpatch_jax.train import eval_job, restore, trainer  # noqa: E402
from configs import digits  # noqa: E402


def _config():
  config = digits.get_config("debug")
  config.num_steps = 2
  config.sampling.num_inpaint = 0
  config.eval.elbo_steps = 2
  config.eval.paths = ("homogeneous", "raster", "random")
  config.data.eval_split = "test"
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval_run")
  trainer.train_and_evaluate(_config(), workdir)
  return workdir


def test_path_names_and_paths():
  assert eval_job.path_names(_config().eval) == ("homogeneous", "raster", "random")
  config = _config()
  config.eval.paths = ("homogeneous", "zigzag")
  with pytest.raises(ValueError, match="zigzag"):
    eval_job.path_names(config.eval)
  config.eval.paths = ()
  with pytest.raises(ValueError, match=r"eval\.paths"):
    eval_job.path_names(config.eval)
  grid = (3, 2, 4)
  for name in eval_job.PATHS:
    path = eval_job.make_path(name, grid, jax.random.key(0))
    paths_lib.check_path(path, grid)
  random = eval_job.make_path("random", grid, jax.random.key(0))
  levels = np.stack([random(jnp.full((3, 1, 1), s)) for s in np.linspace(0.05, 0.95, 19)])
  assert not np.array_equal(levels[:, 0], levels[:, 1])  # an order per example


class _TinyFeatures(nnx.Module):
  """A stand-in for Inception (the conversion is tested in test_evaluation_inception.py)."""

  def __init__(self):
    self.dense = nnx.Linear(3, 16, rngs=nnx.Rngs(0))

  def __call__(self, x):
    pooled = jnp.stack([x[:, i::37, j::41].mean((1, 2)) for i in range(4) for j in range(4)], 1)
    return jnp.tanh(self.dense(pooled)).reshape(x.shape[0], -1)


def test_eval_mode_writes_bpd_per_path_and_fid(trained, monkeypatch, tmp_path):
  made = []

  class Extractor(evaluation.FeatureExtractor):
    def __init__(self, mesh=None, **kwargs):
      made.append(1)
      super().__init__(model=_TinyFeatures(), mesh=mesh, **kwargs)

  monkeypatch.setattr(evaluation, "FeatureExtractor", Extractor)
  config = _config()
  config.eval.fid_samples = 12
  config.eval.fid_batch_size = 8
  config.eval.fid_split = "test"
  config.eval.fid_cache_dir = str(tmp_path / "cache")
  results = eval_job.evaluate(config, trained)
  for key in ("eval/bpd", "eval/bpd_raster", "eval/bpd_random"):
    assert np.isfinite(results[key]) and results[key] > 0, key
  assert results["eval/bpd_raster"] != results["eval/bpd"]
  assert results["eval/num_samples"] == 12
  assert np.isfinite(results["eval/fid"]) and results["eval/fid"] > 0
  assert np.isfinite(results["eval/kid"])
  saved = json.loads((trained / "eval_step_2.json").read_text())
  assert saved["eval/fid"] == results["eval/fid"]
  assert saved["settings"]["paths"] == ["homogeneous", "raster", "random"]
  # The reference statistics were cached once: a second use reads the file, not the data.
  (cached,) = list((tmp_path / "cache").iterdir())

  def no_data():
    raise AssertionError("the cached statistics were recomputed")

  reference = evaluation.reference_statistics(eval_job.reference_name(config), no_data,
                                              Extractor(), config.eval.fid_cache_dir)
  assert reference.stats.count == 180 and cached.exists()


def test_eval_rejects_bad_paths_before_work(trained):
  config = _config()
  config.eval.paths = ("spiral",)
  with pytest.raises(ValueError, match="spiral"):
    eval_job.evaluate(config, trained)


def test_sample_and_eval_skip_a_damaged_latest_checkpoint(trained, tmp_path, caplog):
  """Read-only modes restore the newest checkpoint that restores and leave the damaged one."""
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  config = _config()
  config.num_steps = 4  # resume for two more steps: checkpoints 2 and 4
  trainer.train_and_evaluate(config, workdir)
  for data_file in (workdir / "checkpoints" / "4" / "state").rglob("d/*"):  # every array file
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
  with caplog.at_level("WARNING"):
    *_, step = restore.restore_latest(config, workdir)
  assert step == 2 and "step 4" in caplog.text
  assert (workdir / "checkpoints" / "4").exists()  # nothing moved in a read-only mode
