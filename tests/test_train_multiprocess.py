"""Two processes on localhost (jax.distributed on CPU, 4 fake devices each) train exactly like one
process with 8 devices: same losses, gradient norms, parameter norms and checkpoints.

Run as a script, this file is the worker: `python tests/test_train_multiprocess.py PROCESS_ID
NUM_PROCESSES PORT WORKDIR OUT_JSON`.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3


def _config():
  from configs import digits

  config = digits.get_config("debug")
  config.num_steps = STEPS
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 3e-3
  config.mesh.data, config.mesh.fsdp, config.mesh.min_shard_size = 4, 2, 0
  config.checkpoint.every_steps = 2
  return config


def _train(workdir: str) -> dict:
  """Trains `_config()` in `workdir`; returns the logged scalars per step."""
  from clu import metric_writers

  from asyncpatch_jax.train import trainer

  class Recorder(metric_writers.MetricWriter):
    def __init__(self):
      self.scalars = {}

    def write_scalars(self, step, scalars):
      self.scalars.setdefault(str(int(step)), {}).update(
          {k: float(v) for k, v in scalars.items() if k.startswith("train/")})

    def write_summaries(self, *a, **k): pass
    def write_images(self, *a, **k): pass
    def write_videos(self, *a, **k): pass
    def write_audios(self, *a, **k): pass
    def write_texts(self, *a, **k): pass
    def write_histograms(self, *a, **k): pass
    def write_hparams(self, *a, **k): pass
    def flush(self): pass
    def close(self): pass

  recorder = Recorder()
  trainer.train_and_evaluate(_config(), workdir, writer=recorder)
  return recorder.scalars


def _worker(process_id: int, num_processes: int, port: int, workdir: str, out: str) -> None:
  sys.path.insert(0, str(ROOT))
  import jax

  jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 8 // num_processes
  scalars = _train(workdir)
  pathlib.Path(out).write_text(json.dumps({"process": jax.process_index(), "scalars": scalars}))
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three processes compile the model: about 1 min alone, 3 on a busy machine
def test_two_processes_match_one_process(tmp_path):
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  reference = _train(str(tmp_path / "single"))  # this process: 8 devices (tests/conftest.py)

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(i), "2", str(port), str(workdir),
       str(tmp_path / f"out{i}.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]

  outputs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert [o["process"] for o in outputs] == [0, 1]
  assert sorted(reference) == [str(s) for s in range(1, STEPS + 1)]
  for out in outputs:
    assert sorted(out["scalars"]) == sorted(reference)
    for step, values in reference.items():
      for key in ("train/loss", "train/grad_norm", "train/param_norm"):
        got, want = out["scalars"][step][key], values[key]
        assert abs(got - want) <= 1e-5 * abs(want) + 1e-7, (step, key, got, want)
  # One checkpoint for the job, with the grain iterator state of each process.
  for step in (2, STEPS):
    data_dir = workdir / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
