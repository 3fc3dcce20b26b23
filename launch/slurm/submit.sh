#!/usr/bin/env bash
# Submit a multi-node training job to SLURM (one process per GPU).
#
# Usage:
#   launch/slurm/submit.sh --nodes N --gpus_per_node G [--partition P] [--account A] \
#     [--job-name NAME] [--time HH:MM:SS] [--env KEY=VALUE]... [--dry-run] \
#     -- --gin_file=gin/spectron_base.gin --gin.MODEL_DIR="'/shared/run'"
# --env sets a variable for the job, e.g. --env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
# or --env PYTHON=.venv/bin/python (the interpreter each task runs; default python3).
# --dry-run prints the sbatch command, and the srun line each task would run, instead of submitting.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage_error() {
  echo "submit.sh: $*" >&2
  echo "usage: $0 --nodes N --gpus_per_node G [--partition P] [--account A] [--job-name NAME]" \
    "[--time HH:MM:SS] [--env KEY=VALUE]... [--dry-run] -- <train flags>" >&2
  exit 2
}
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || usage_error "$1 needs a value"; }

NODES=1 GPUS=1 PARTITION="" ACCOUNT="" JOB_NAME="" TIME="24:00:00" DRY_RUN=0
ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
  case "$1" in
    --nodes) need "$@"; NODES="$2"; shift 2 ;;
    --gpus_per_node) need "$@"; GPUS="$2"; shift 2 ;;
    --partition) need "$@"; PARTITION="$2"; shift 2 ;;
    --account) need "$@"; ACCOUNT="$2"; shift 2 ;;
    --job-name | --job_name) need "$@"; JOB_NAME="$2"; shift 2 ;;
    --time) need "$@"; TIME="$2"; shift 2 ;;
    --env) need "$@"; ENVS+=("$2"); shift 2 ;;
    --dry-run | --dry_run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) usage_error "unknown argument: $1 (train flags go after --)" ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes must be a positive integer: $NODES"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus_per_node must be a positive integer: $GPUS"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants KEY=VALUE: $kv"
done

cmd=(sbatch --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --time="$TIME")
[[ -n "$PARTITION" ]] && cmd+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && cmd+=(--account="$ACCOUNT")
[[ -n "$JOB_NAME" ]] && cmd+=(--job-name="$JOB_NAME")
if [[ ${#ENVS[@]} -gt 0 ]]; then
  # The variables ride in sbatch's own environment, which --export=ALL hands to the job (some
  # sites default to exporting nothing); --export=ALL,KEY=VALUE would split values at commas.
  cmd=(env "${ENVS[@]}" "${cmd[@]}" --export=ALL)
fi
cmd+=("$HERE/train.sbatch" "$@")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  # train.sbatch itself prints its srun line, with the same variables set.
  printf '# each task runs: '
  env ${ENVS[@]+"${ENVS[@]}"} SPECTRON_SRUN_DRY_RUN=1 bash "$HERE/train.sbatch" "$@"
else
  "${cmd[@]}"
fi
