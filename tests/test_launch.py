"""launch/: shellcheck-clean scripts with working --help and --dry-run that refuse bad launches."""

import pathlib
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def _run(*args, check=False):
  return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, check=check,
                        timeout=60)


def _shellcheck() -> str:
  found = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent / "shellcheck")
  if not pathlib.Path(found).exists():
    pytest.fail("shellcheck is missing: `pip install -c constraints.txt -e '.[test]'` brings it")
  return found


def test_scripts_exist_and_are_shellcheck_clean():
  assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm.sh", "local.sh"}
  result = subprocess.run([_shellcheck(), *map(str, SCRIPTS)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  result = _run(script, "--help")
  assert result.returncode == 0 and "Usage:" in result.stdout and "--dry-run" in result.stdout


def test_tpu_pod_runs_on_all_workers_only():
  tpu = LAUNCH / "tpu_pod.sh"
  out = _run(tpu, "run", "--name", "ap", "--zone", "us-central2-b", "--workdir", "gs://b/run",
             "--dry-run", "--", "--config.seed=3", check=True).stdout
  assert "--worker=all" in out and "asyncpatch_jax.main" in out and "--config.seed=3" in out
  assert "--workdir=gs://b/run" in out
  for cmd in ("create", "setup", "stop", "delete", "logs"):
    res = _run(tpu, cmd, "--name", "ap", "--zone", "z", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "gcloud compute tpus" in res.stdout
    if cmd in ("setup", "stop"):
      assert "--worker=all" in res.stdout
  bad = _run(tpu, "run", "--name", "ap", "--zone", "z", "--workdir", "gs://b", "--worker=0")
  assert bad.returncode == 2 and "jax.distributed hangs" in bad.stderr
  local = _run(tpu, "run", "--name", "ap", "--zone", "z", "--workdir", "/tmp/run", "--dry-run")
  assert local.returncode == 2 and "gs://" in local.stderr
  assert _run(tpu, "launch", "--name", "ap").returncode == 2
  queued = _run(tpu, "create", "--name", "ap", "--zone", "z", "--queued", "--spot", "--dry-run")
  assert "queued-resources create" in queued.stdout and "--spot" in queued.stdout


def test_slurm_script_takes_the_coordinator_from_the_allocation(tmp_path):
  out = _run(LAUNCH / "slurm.sh", "--workdir", "/shared/run", "--nodes", "4", "--partition",
             "gpu", "--dry-run", "--", "--config.seed=1", check=True).stdout
  assert "#SBATCH --nodes=4" in out and "#SBATCH --partition=gpu" in out
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in out
  assert "--process_id=\\$SLURM_PROCID" in out and "--config.seed=1" in out
  script = tmp_path / "job.sbatch"
  script.write_text(out.rsplit("sbatch <", 1)[0])
  result = subprocess.run([_shellcheck(), "-s", "bash", str(script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout
  assert _run(LAUNCH / "slurm.sh", "--dry-run").returncode == 2  # no workdir
  assert _run(LAUNCH / "slurm.sh", "--workdir", "/x", "--nodes", "two").returncode == 2


def test_local_launch_dry_run_gives_each_process_its_rank():
  out = _run(LAUNCH / "local.sh", "--workdir", "/tmp/ap", "--num-processes", "3",
             "--devices-per-process", "2", "--dry-run", check=True).stdout.strip().splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    assert f"--process_id={i}" in line and "--num_processes=3" in line
    assert "--xla_force_host_platform_device_count=2" in line
  gpu = _run(LAUNCH / "local.sh", "--workdir", "/tmp/ap", "--platform", "gpu",
             "--devices-per-process", "2", "--dry-run", check=True).stdout.splitlines()
  assert "CUDA_VISIBLE_DEVICES=2,3" in gpu[1].replace("\\", "")
  assert _run(LAUNCH / "local.sh", "--workdir", "/x", "--platform", "tpu").returncode == 2
