#!/usr/bin/env bash
# Run N asyncpatch_jax processes on this machine, as a multi-host job would run on N hosts.
#
# Each process gets its own slice of devices (fake CPU devices with --platform cpu, or a share
# of the GPUs), process 0 is the jax.distributed coordinator on localhost, and if any process
# fails the others are stopped, so a broken run never hangs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh --workdir DIR [options] [-- extra main.py flags]

Options:
  --num-processes N         processes (default: 2)
  --devices-per-process K   devices per process (default: 4)
  --platform cpu|gpu        cpu: K fake CPU devices each; gpu: K GPUs each (default: cpu)
  --config PATH[:ARG]       run configuration (default: configs/digits.py:debug)
  --workdir DIR             checkpoints and logs (required); process logs go to DIR/logs/
  --mode MODE               train | sample | eval (default: train)
  --port PORT               coordinator port on localhost (default: 12355)
  --python PATH             interpreter (default: .venv/bin/python, else python3)
  --dry-run                 print the commands instead of running them
  -h, --help                this help

Example:
  launch/local.sh --num-processes 2 --devices-per-process 4 --workdir /tmp/ap2
USAGE
}

die() { echo "local.sh: $*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
num=2 per=4 platform="cpu" config="configs/digits.py:debug" workdir="" mode="train"
port=12355 python="" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-processes) num="${2:?--num-processes needs a value}"; shift 2 ;;
    --devices-per-process) per="${2:?--devices-per-process needs a value}"; shift 2 ;;
    --platform) platform="${2:?--platform needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$workdir" ]] || die "--workdir is required"
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$num'"
[[ "$per" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$per'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
case "$platform" in cpu|gpu) ;; *) die "--platform must be cpu or gpu, got '$platform'" ;; esac
case "$mode" in train|sample|eval) ;; *) die "--mode must be train, sample or eval" ;; esac
if [[ -z "$python" ]]; then
  if [[ -x "$repo_root/.venv/bin/python" ]]; then python="$repo_root/.venv/bin/python"
  else python="python3"; fi
fi

commands=()
for ((i = 0; i < num; i++)); do
  if [[ "$platform" == cpu ]]; then
    env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$per")
  else
    first=$((i * per))
    ids="$(seq -s, "$first" $((first + per - 1)))"
    env_vars=("CUDA_VISIBLE_DEVICES=$ids")
  fi
  cmd=(env "${env_vars[@]}" "$python" -m asyncpatch_jax.main --config="$config"
       --workdir="$workdir" --mode="$mode" --coordinator_address="localhost:$port"
       --num_processes="$num" --process_id="$i" "${extra[@]}")
  commands+=("$(printf '%q ' "${cmd[@]}")")
done

if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

mkdir -p "$workdir/logs"
cd "$repo_root"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < num; i++)); do
  bash -c "${commands[$i]}" > "$workdir/logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
# Wait for the processes one finish at a time (they are this shell's only background jobs); on
# the first failure stop the rest.
for ((done_count = 0; done_count < num; done_count++)); do
  if ! wait -n; then
    status=1
    echo "local.sh: a process failed; stopping the others (logs in $workdir/logs/)" >&2
    break
  fi
done
if [[ $status -ne 0 ]]; then
  for ((i = 0; i < num; i++)); do
    echo "--- process $i (last lines) ---" >&2
    tail -n 20 "$workdir/logs/process_$i.log" >&2 || true
  done
  exit 1
fi
trap - EXIT
echo "local.sh: all $num processes finished; logs in $workdir/logs/"
