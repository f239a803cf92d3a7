#!/usr/bin/env bash
# Submit a multi-node asyncpatch_jax job to SLURM: one process per node, all its GPUs.
#
# The batch script takes the jax.distributed coordinator from the allocation (the first node
# of $SLURM_JOB_NODELIST) and passes it, the process count and each process's rank to main.py.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh --workdir DIR [options] [-- extra main.py flags]

Options:
  --nodes N             nodes (default: 2)
  --gpus-per-node G     GPUs per node, all used by the node's one process (default: 8)
  --partition P         SLURM partition
  --account A           SLURM account
  --time HH:MM:SS       time limit (default: 48:00:00)
  --config PATH[:ARG]   run configuration (default: configs/imagenet.py)
  --workdir DIR         checkpoints and logs, on a filesystem shared by all nodes (required)
  --mode MODE           train | sample | eval (default: train)
  --port PORT           coordinator port (default: 12345)
  --venv DIR            virtual environment on the shared filesystem (default: ./.venv)
  --dry-run             print the batch script and the sbatch command instead of submitting
  -h, --help            this help

Example:
  launch/slurm.sh --nodes 4 --partition gpu --workdir /shared/runs/in256 \
      -- --config.num_steps=400000
USAGE
}

die() { echo "slurm.sh: $*" >&2; exit 2; }

nodes=2 gpus=8 partition="" account="" time_limit="48:00:00" config="configs/imagenet.py"
workdir="" mode="train" port=12345 venv=".venv" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --partition) partition="${2:?--partition needs a value}"; shift 2 ;;
    --account) account="${2:?--account needs a value}"; shift 2 ;;
    --time) time_limit="${2:?--time needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$workdir" ]] || die "--workdir is required (a directory every node can reach)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
case "$mode" in train|sample|eval) ;; *) die "--mode must be train, sample or eval" ;; esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
main_flags=(--config="$config" --workdir="$workdir" --mode="$mode" "${extra[@]}")

script="#!/usr/bin/env bash
#SBATCH --job-name=asyncpatch
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=$workdir/slurm-%j.out
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
set -euo pipefail
cd $(printf %q "$repo_root")
coordinator=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):$port\"
echo \"coordinator \$coordinator, \$SLURM_NTASKS processes\"
# SIGTERM (preemption, scancel) reaches every process; each saves a checkpoint and exits.
srun --kill-on-bad-exit=1 bash -c \"exec $(printf %q "$venv")/bin/python -m asyncpatch_jax.main \\
  --coordinator_address=\$coordinator --num_processes=\\\$SLURM_NTASKS \\
  --process_id=\\\$SLURM_PROCID$(printf ' %q' "${main_flags[@]}")\"
"

if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "$script"
  echo "sbatch <the script above>"
  exit 0
fi
mkdir -p "$workdir"
printf '%s\n' "$script" | sbatch
