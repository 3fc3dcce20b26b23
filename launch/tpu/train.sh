#!/usr/bin/env bash
# Start training on every worker of a Cloud TPU VM slice: `launch/tpu/tpu.sh train`, kept
# under its old name.
#
# Usage:
#   launch/tpu/train.sh --tpu NAME --zone ZONE [--project P] [--repo_dir DIR] [--python PY] \
#     [--dry-run] -- --gin_file=gin/spectron_base.gin --gin.MODEL_DIR="'gs://bucket/run'"
# The run is detached (output in REPO_DIR/train.log on each worker) and worker 0's log is
# followed; --python defaults to the .venv that `tpu.sh install` makes. All of tpu.sh's options
# apply (launch/tpu/tpu.sh help).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/tpu.sh" train "$@"
