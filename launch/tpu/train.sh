#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: runs `python -m spectron_jax.train` on every worker at once.
# jax.distributed.initialize() finds the coordinator itself on Cloud TPU; each process reads its
# own data shard; checkpoints and TensorBoard go to MODEL_DIR (use a gs:// path on a pod).
#
# Usage:
#   launch/tpu/train.sh --tpu NAME --zone ZONE [--project P] [--repo_dir DIR] [--dry-run] \
#     -- --gin_file=gin/spectron_base.gin --gin.MODEL_DIR="'gs://bucket/run'"
# --dry-run prints the commands instead of running them.
set -euo pipefail

TPU="" ZONE="" PROJECT="" REPO_DIR="~/spectron-jax" DRY_RUN=0 PYTHON="python3"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo_dir) REPO_DIR="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument: $1 (train flags go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--dry-run] -- <train flags>" >&2
  exit 2
fi

train_cmd="cd ${REPO_DIR} && ${PYTHON} -m spectron_jax.train"
for arg in "$@"; do train_cmd+=" $(printf '%q' "$arg")"; done

cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && cmd+=(--project "$PROJECT")
cmd+=(--command "$train_cmd")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
