#!/usr/bin/env bash
# Create, set up, run, watch and stop asyncpatch_jax on a Cloud TPU pod slice.
#
# Every command that touches the workers runs on all of them (--worker=all): a job started on
# one worker of a pod hangs in jax.distributed waiting for the others, so this script has no
# way to target a single worker except for reading logs.
#
# Data on a bucket: the run reads its latent cache (ArrayRecord) and LSUN exports (LMDB) from
# local files, because array_record's and LMDB's readers open local files only (the array_record
# 0.8 wheel has its own gs:// client, but every random 32 KB record would be a GCS request; it is
# untested here). With --config.data.latent_dir=gs://... each worker copies the cache once into
# its staging folder (asyncpatch_jax/data/staging.py) before the first step. `setup --stage URL`
# does that copy ahead, with `gcloud storage rsync` on all workers in parallel: the ImageNet-256
# cache in float16 (1,281,167 records of 32,772 bytes, ~42 GB) takes roughly 1-3 minutes per
# worker at 0.3-0.7 GB/s (an estimate, not measured), and fits the v4 VMs' 100 GB boot disk.
# A gcsfuse mount would also work but adds a daemon per worker and, without its file cache, a
# request per random record; with its file cache it is this same copy, so the recipe copies.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- extra main.py flags]

Commands:
  create   create the TPU VM slice (or a queued resource with --queued)
  setup    copy this checkout to every worker and install it (.venv, jax[tpu], pinned)
  run      start training on every worker (background; survives ssh disconnects)
  logs     follow worker 0's log
  stop     send SIGTERM to the job on every worker (it saves a checkpoint and exits)
  delete   delete the slice (or the queued resource)

Options:
  --name NAME           TPU name (required)
  --zone ZONE           e.g. us-central2-b (required)
  --project PROJECT     GCP project (default: gcloud's configured project)
  --accelerator TYPE    e.g. v4-32, v5litepod-64 (default: v4-32)
  --version RUNTIME     TPU software version (default: tpu-ubuntu2204-base)
  --queued              create/delete through queued resources
  --spot                request spot capacity
  --config PATH[:ARG]   run configuration (default: configs/imagenet.py)
  --workdir gs://...    checkpoints and logs; must be a bucket shared by all workers (run)
  --stage gs://...      setup: copy this bucket folder (a latent cache, an LSUN export) to every
                        worker's staging folder, where the run reads it (repeatable)
  --staging-dir DIR     the workers' staging folder (setup, run; default
                        ~/.cache/asyncpatch_jax/staging, $ASYNCPATCH_STAGING_DIR of the run)
  --mode MODE           train | sample | eval (default: train)
  --dry-run             print the commands instead of running them
  -h, --help            this help

Example:
  launch/tpu_pod.sh create --name ap --zone us-central2-b --accelerator v4-32
  launch/tpu_pod.sh setup  --name ap --zone us-central2-b \
      --stage gs://my-bucket/latents/imagenet256/train
  launch/tpu_pod.sh run    --name ap --zone us-central2-b --workdir gs://my-bucket/ap/in256 \
      -- --config.num_steps=400000
USAGE
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

command="${1:-}"
[[ -z "$command" || "$command" == "-h" || "$command" == "--help" ]] && { usage; exit 0; }
shift
case "$command" in
  create|setup|run|logs|stop|delete) ;;
  *) die "unknown command '$command' (see --help)" ;;
esac

name="" zone="" project="" accelerator="v4-32" version="tpu-ubuntu2204-base"
queued=0 spot=0 config="configs/imagenet.py" workdir="" mode="train" dry_run=0
# The tilde is expanded on the workers, not here.
# shellcheck disable=SC2088
staging_dir='~/.cache/asyncpatch_jax/staging'
extra=() stage=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --stage) stage+=("${2:?--stage needs a value}"); shift 2 ;;
    --staging-dir) staging_dir="${2:?--staging-dir needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --worker|--worker=*)
      die "--worker is not accepted: a pod job must start on all workers at once, or" \
          "jax.distributed hangs waiting for the missing ones" ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
case "$mode" in train|sample|eval) ;; *) die "--mode must be train, sample or eval" ;; esac
for url in ${stage[@]+"${stage[@]}"}; do
  [[ "$url" == gs://* ]] || die "--stage takes a gs:// folder, not '$url'"
done

gcloud_flags=(--zone="$zone")
[[ -n "$project" ]] && gcloud_flags+=(--project="$project")

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"
}

# The tilde is expanded on the workers, not here.
# shellcheck disable=SC2088
remote_dir='~/asyncpatch_jax'

case "$command" in
  create)
    if [[ $queued -eq 1 ]]; then
      args=(gcloud compute tpus queued-resources create "$name" "${gcloud_flags[@]}"
            --node-id="$name" --accelerator-type="$accelerator" --runtime-version="$version")
      [[ $spot -eq 1 ]] && args+=(--spot)
    else
      args=(gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}"
            --accelerator-type="$accelerator" --version="$version")
      [[ $spot -eq 1 ]] && args+=(--spot)
    fi
    run "${args[@]}"
    ;;
  setup)
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    tarball="/tmp/asyncpatch_jax_$$.tar.gz"
    run git -C "$repo_root" archive --format=tar.gz --prefix=asyncpatch_jax/ -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:/tmp/asyncpatch_jax.tar.gz" \
      "${gcloud_flags[@]}" --worker=all
    ssh_all "rm -rf $remote_dir && tar -xzf /tmp/asyncpatch_jax.tar.gz -C ~ && cd $remote_dir \
&& python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip \
&& .venv/bin/pip install -q -c constraints.txt -e '.[tpu]' \
&& .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
    run rm -f "$tarball"
    for url in ${stage[@]+"${stage[@]}"}; do
      # The layout data/staging.py reads: <staging dir>/gs/<bucket>/<path>.
      local_copy="$staging_dir/gs/${url#gs://}"
      local_copy="${local_copy%/}"
      ssh_all "mkdir -p $local_copy && time gcloud storage rsync --recursive \
$(printf %q "${url%/}") $local_copy && du -sh $local_copy && df -h $local_copy"
    done
    ;;
  run)
    [[ "$workdir" == gs://* ]] || die "run needs --workdir gs://BUCKET/PATH: every worker must" \
      "see the same checkpoints (a local path differs per worker)"
    quoted_extra=""
    if [[ ${#extra[@]} -gt 0 ]]; then quoted_extra="$(printf ' %q' "${extra[@]}")"; fi
    ssh_all "cd $remote_dir && ASYNCPATCH_STAGING_DIR=$staging_dir \
nohup .venv/bin/python -m asyncpatch_jax.main \
--config=$(printf %q "$config") --workdir=$(printf %q "$workdir") --mode=$mode$quoted_extra \
> ~/asyncpatch.log 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=0 \
      --command="tail -n 200 -f ~/asyncpatch.log"
    ;;
  stop)
    ssh_all "pkill -TERM -f asyncpatch_jax.main || true"
    ;;
  delete)
    if [[ $queued -eq 1 ]]; then
      run gcloud compute tpus queued-resources delete "$name" "${gcloud_flags[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet
    fi
    ;;
esac
