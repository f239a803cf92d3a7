"""`--mode=eval` bits/dim with standard errors, and the paired comparison against a second
checkpoint (`eval.compare_workdir`): common random numbers, so a checkpoint compared with itself
differs by exactly zero."""

import json

import numpy as np
import pytest
import test_evaluate  # its config: the digits debug run with bits/dim along three paths

from asyncpatch_jax.train import eval_job, trainer, validation


def _config():
  config = test_evaluate._config()
  config.num_steps = 4  # checkpoints at steps 2 and 4
  config.eval.paths = ("homogeneous", "raster")
  return config


def test_eval_reports_standard_errors_and_paired_differences(tmp_path):
  trained = tmp_path / "run"
  trainer.train_and_evaluate(_config(), trained)
  config = _config()
  config.eval.compare_workdir = str(trained)
  config.eval.compare_step = 2
  results = eval_job.evaluate(config, trained)
  for key in ("bpd", "bpd_raster"):
    mean, se = results[f"eval/{key}"], results[f"eval/{key}_se"]
    assert np.isfinite(mean) and 0 < se < mean, key
    diff = results[f"eval/{key}_diff"]
    np.testing.assert_allclose(diff, mean - results[f"eval/{key}_compare"], rtol=1e-5,
                               atol=1e-6)
    assert results[f"eval/{key}_diff_se"] > 0
  saved = json.loads((trained / "eval_step_4.json").read_text())
  assert saved["settings"]["compare"]["step"] == 2
  assert saved["eval/bpd_raster_diff_se"] == results["eval/bpd_raster_diff_se"]

  # Compared with itself: the same x0, s and noise give exactly the same bounds.
  config.eval.compare_step = 0
  same = eval_job.evaluate(config, trained)
  assert same["eval/bpd_diff"] == 0.0 and same["eval/bpd_diff_se"] == 0.0
  assert same["eval/bpd"] == results["eval/bpd"]


  # A compared run without checkpoints, or without the step asked for.
  config.eval.compare_workdir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    eval_job.evaluate(config, trained)
  config.eval.compare_workdir = str(trained)
  config.eval.compare_step = 3
  with pytest.raises(FileNotFoundError, match="saved steps"):
    eval_job.evaluate(config, trained)


def test_compare_needs_bits_per_dim():
  config = _config()
  config.eval.compare_workdir = "/some/run"
  config.eval.elbo_steps = 0
  with pytest.raises(validation.ConfigError, match="compare_workdir compares bits/dim"):
    validation.validate_config(config)
