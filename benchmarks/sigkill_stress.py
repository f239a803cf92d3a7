r"""SIGKILL stress test: kill training at random points, restart, compare with an uninterrupted run.

Trains `configs/digits.py:debug` (checkpoints every 2 steps, asynchronous saves) once without
interruption and once killed with SIGKILL `--kills` times at random moments — during steps, during
asynchronous saves, during start-up and restore — restarting after each kill. Records, per kill,
the committed steps, any unfinished orbax save left behind (`*.orbax-checkpoint-tmp*`) and the
step the next start resumed from; at the end, whether the final states (parameters, optimizer,
EMAs, step, data position) are bitwise equal. Writes a results JSON.

  python benchmarks/sigkill_stress.py --kills 8 --num_steps 80 --out results/sigkill_stress.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import re
import signal
import subprocess
import sys
import time
from typing import Any

from asyncpatch_jax import file_io

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/digits.py:debug"
_TMP_GLOB = "*.orbax-checkpoint-tmp*"


def train_argv(workdir: pathlib.Path, num_steps: int, every: int, cache_dir: pathlib.Path
               ) -> list[str]:
  """The command line of one (re)start: resumes from `workdir` if it holds checkpoints."""
  return [sys.executable, "-m", "asyncpatch_jax.main", f"--config={CONFIG}",
          f"--workdir={workdir}", f"--config.num_steps={num_steps}",
          f"--config.checkpoint.every_steps={every}", "--config.checkpoint.max_to_keep=3",
          "--config.checkpoint.async_save=True", f"--config.logging.log_every_steps={every}",
          f"--jax_compilation_cache_dir={cache_dir}",
          "--jax_persistent_cache_min_compile_time_secs=0"]


def train_env(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return env


def committed_steps(workdir: pathlib.Path) -> list[int]:
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() \
      else []


def unfinished_saves(workdir: pathlib.Path) -> list[str]:
  ckpts = workdir / "checkpoints"
  return sorted(p.name for p in ckpts.glob(_TMP_GLOB)) if ckpts.exists() else []


def run_uninterrupted(workdir: pathlib.Path, *, num_steps: int, every: int,
                      cache_dir: pathlib.Path, devices: int = 1, timeout: float = 900) -> float:
  """One run to the end; returns its wall time."""
  start = time.monotonic()
  with open(workdir.parent / f"{workdir.name}.log", "w") as log:
    proc = subprocess.run(train_argv(workdir, num_steps, every, cache_dir), cwd=ROOT,
                          env=train_env(devices), stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"uninterrupted run failed (exit {proc.returncode}); see {log.name}")
  return time.monotonic() - start


def _resumed_from(log_text: str) -> int | None:
  found = re.search(r"Starting at step (\d+) of \d+", log_text)
  return int(found.group(1)) if found else None


def run_with_kills(workdir: pathlib.Path, *, kills: int, num_steps: int, every: int,
                   cache_dir: pathlib.Path, seed: int, devices: int = 1,
                   early_fraction: float = 0.0, max_delay_s: float = 1.0,
                   attempt_timeout_s: float = 600) -> dict[str, Any]:
  """Starts training `kills` times and SIGKILLs each start at a random moment, then lets the
  last start finish. A kill waits for a newly committed checkpoint (so the run progresses) plus
  a random delay in [0, `max_delay_s`); with probability `early_fraction` it instead hits a
  random moment of start-up (compilation, restore) before any new checkpoint."""
  rng = random.Random(seed)
  argv, env = train_argv(workdir, num_steps, every, cache_dir), train_env(devices)
  events, resumes = [], []
  attempt = 0
  start_all = time.monotonic()
  startup_s = None  # seen start-up time (first checkpoint of an attempt), for early kills
  while True:
    attempt += 1
    before = committed_steps(workdir)
    last_before = before[-1] if before else 0
    kill = len(events) < kills
    early = kill and startup_s is not None and rng.random() < early_fraction
    log_path = workdir.parent / f"{workdir.name}.attempt{attempt}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
      proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
      deadline = None
      if early:
        deadline = t0 + rng.uniform(0.0, startup_s)
      while proc.poll() is None:
        now = time.monotonic()
        if now - t0 > attempt_timeout_s:
          proc.kill()
          raise RuntimeError(f"attempt {attempt} made no progress in {attempt_timeout_s} s; "
                             f"see {log_path}")
        if kill and deadline is None:
          steps = committed_steps(workdir)
          if steps and steps[-1] > last_before:
            if startup_s is None:
              startup_s = now - t0
            deadline = now + rng.uniform(0.0, max_delay_s)
        if kill and deadline is not None and now >= deadline:
          os.kill(proc.pid, signal.SIGKILL)
          proc.wait()
          break
        time.sleep(0.01)
    text = log_path.read_text(errors="replace")
    resumes.append({"attempt": attempt, "expected": last_before,
                    "resumed_from": _resumed_from(text),
                    "damaged_skipped": text.count("does not restore")})
    if proc.returncode == -signal.SIGKILL:
      steps = committed_steps(workdir)
      events.append({"attempt": attempt, "seconds_after_start": round(time.monotonic() - t0, 2),
                     "early": early, "committed_before": last_before,
                     "committed_at_kill": steps[-1] if steps else 0,
                     "unfinished_saves_left": unfinished_saves(workdir)})
      continue
    if proc.returncode != 0:
      raise RuntimeError(f"attempt {attempt} failed with exit code {proc.returncode}; see "
                         f"{log_path}")
    break  # finished
  return {"kills": events, "starts": resumes, "wall_s": round(time.monotonic() - start_all, 1)}


def compare_final_states(reference: pathlib.Path, resumed: pathlib.Path, step: int
                         ) -> dict[str, Any]:
  """Bitwise comparison of the `state` items (and data positions) of both runs at `step`."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  def load(workdir):
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(workdir / "checkpoints" / str(step) / "state")
    data = sorted((workdir / "checkpoints" / str(step) / "data").glob("*.json"))
    return (jax.tree_util.tree_flatten_with_path(state)[0],
            [p.read_text() for p in data])

  (ref, ref_data), (got, got_data) = load(reference), load(resumed)
  mismatched = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(ref, got)
                if np.asarray(a).dtype != np.asarray(b).dtype
                or not np.array_equal(np.asarray(a), np.asarray(b))]
  same_structure = [p for p, _ in ref] == [p for p, _ in got]
  return {"leaves": len(ref), "same_structure": same_structure, "mismatched_leaves": mismatched,
          "data_position_equal": ref_data == got_data,
          "bitwise_equal": same_structure and not mismatched and ref_data == got_data}


def stress(out_dir: pathlib.Path, *, kills: int, num_steps: int, every: int, seed: int,
           devices: int = 1, early_fraction: float = 0.0, max_delay_s: float = 1.0
           ) -> dict[str, Any]:
  """The uninterrupted reference, the killed-and-restarted run, and their comparison."""
  out_dir.mkdir(parents=True, exist_ok=True)
  cache = out_dir / "jax_cache"
  reference, resumed = out_dir / "uninterrupted", out_dir / "killed"
  ref_s = run_uninterrupted(reference, num_steps=num_steps, every=every, cache_dir=cache,
                            devices=devices)
  killed = run_with_kills(resumed, kills=kills, num_steps=num_steps, every=every,
                          cache_dir=cache, seed=seed, devices=devices,
                          early_fraction=early_fraction, max_delay_s=max_delay_s)
  comparison = compare_final_states(reference, resumed, num_steps)
  starts = killed["starts"]
  return {
      "config": CONFIG, "num_steps": num_steps, "checkpoint_every_steps": every,
      "devices": devices, "seed": seed, "kills_requested": kills,
      "kills": len(killed["kills"]), "restarts": len(starts) - 1,
      "kills_leaving_unfinished_saves": sum(bool(k["unfinished_saves_left"])
                                            for k in killed["kills"]),
      # A start killed before it logged its resume step has None there.
      "every_start_resumed_from_the_latest_committed_step": all(
          s["resumed_from"] == s["expected"] for s in starts if s["resumed_from"] is not None),
      "starts_killed_before_resuming": sum(s["resumed_from"] is None for s in starts),
      "damaged_checkpoints_skipped": sum(s["damaged_skipped"] for s in starts),
      "unfinished_saves_at_end": unfinished_saves(resumed),
      **comparison,
      "uninterrupted_wall_s": round(ref_s, 1), "killed_run_wall_s": killed["wall_s"],
      "kill_events": killed["kills"], "starts": starts,
      "machine": f"{platform.machine()} {os.cpu_count()} CPUs, JAX on CPU",
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=8)
  parser.add_argument("--num_steps", type=int, default=80)
  parser.add_argument("--every", type=int, default=2, help="checkpoint.every_steps")
  parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (data axis)")
  parser.add_argument("--early_fraction", type=float, default=0.4,
                      help="share of kills aimed at start-up / restore instead of training")
  parser.add_argument("--max_delay_s", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--work", default="/tmp/sigkill_stress", help="scratch directory (wiped)")
  parser.add_argument("--out", default=str(ROOT / "results" / "sigkill_stress.json"))
  args = parser.parse_args()
  if args.kills < 1 or args.num_steps < 2 * args.every * (args.kills + 1):
    parser.error("need --kills >= 1 and --num_steps >= 2 * --every * (--kills + 1), so every "
                 "kill can land after a new checkpoint")
  work = pathlib.Path(args.work)
  if work.exists():
    import shutil
    shutil.rmtree(work)
  result = stress(work, kills=args.kills, num_steps=args.num_steps, every=args.every,
                  seed=args.seed, devices=args.devices, early_fraction=args.early_fraction,
                  max_delay_s=args.max_delay_s)
  result["command"] = " ".join(["python", "benchmarks/sigkill_stress.py", *sys.argv[1:]])
  out = pathlib.Path(args.out)
  file_io.write_text(out, json.dumps(result, indent=2) + "\n")
  print(json.dumps({k: v for k, v in result.items() if k not in ("kill_events", "starts")},
                   indent=2))
  if not result["bitwise_equal"]:
    sys.exit("final states differ: " + ", ".join(result["mismatched_leaves"][:10]))


if __name__ == "__main__":
  main()
