#!/usr/bin/env bash
# Submit a multi-node training job to SLURM (one process per GPU).
#
# Usage:
#   launch/slurm/submit.sh --nodes N --gpus_per_node G [--partition P] [--time HH:MM:SS] \
#     [--dry-run] -- --gin_file=gin/spectron_base.gin --gin.MODEL_DIR="'/shared/run'"
# --dry-run prints the sbatch command instead of submitting.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

NODES=1 GPUS=1 PARTITION="" TIME="24:00:00" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus_per_node) GPUS="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done

cmd=(sbatch --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --time="$TIME")
[[ -n "$PARTITION" ]] && cmd+=(--partition="$PARTITION")
cmd+=("$HERE/train.sbatch" "$@")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  echo "# each task runs: srun python3 -m spectron_jax.train $*"
else
  "${cmd[@]}"
fi
