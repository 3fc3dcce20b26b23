#!/usr/bin/env bash
# Cloud TPU VM slices for training, from request to teardown; see USAGE below.
# jax.distributed.initialize() finds each worker's place from the TPU metadata, so the same
# command runs on every worker; several slices are also told how to reach each other (MEGASCALE_*).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

USAGE="usage: launch/tpu/tpu.sh SUBCOMMAND --tpu NAME --zone ZONE [options] [-- <train flags>]

  create   request the slice(s) as a queued resource
           --accelerator TYPE --runtime VERSION [--spot | --best-effort | --reserved]
  status   describe the queued resource
  wait     poll it until it is ACTIVE (exit 1 if it FAILED or was SUSPENDED)
  install  copy the repository to every worker and pip install it into REPO_DIR/.venv
           [--git_url URL [--ref REF]]: clone there instead of copying 'git archive REF'
           (default HEAD: the last commit, without uncommitted changes)
           [--base_python PY]: interpreter for the venv (default python3.11)
  train    start 'PYTHON -m spectron_jax.train --distributed <train flags>' detached on every worker, output
           to REPO_DIR/train.log, then follow worker 0's log (Ctrl-C stops following only)
           [--no_follow] [--env KEY=VALUE]... [--python PY] (default .venv/bin/python)
           [--coordinator HOST] [--megascale_port PORT] (several slices; default: the address
           of slice 0 worker 0, port 8080)
  logs     follow the log of one worker: [--slice S] [--worker W|all] (default 0, 0)
  stop     SIGTERM the training on every worker (it saves a checkpoint) and wait for it to exit
           [--signal KILL]
  delete   delete the queued resource and its TPUs

options for every subcommand:
  --num_slices N   N > 1: multislice, the TPUs NAME-0 .. NAME-<N-1> (default 1: the TPU NAME)
  --project P      --repo_dir DIR (on the workers, default ~/spectron-jax)
  --internal_ip    ssh/scp over internal IPs (when running inside the VPC)
  --dry-run        print every command, one per line, and run nothing"

usage_error() {
  echo "tpu.sh: $*" >&2
  echo "${USAGE%%$'\n'*}" >&2
  echo "(launch/tpu/tpu.sh help: every subcommand and option)" >&2
  exit 2
}

[[ $# -gt 0 ]] || usage_error "missing subcommand"
SUB="$1"
shift
case "$SUB" in
  create | status | wait | install | train | logs | stop | delete) ;;
  help | -h | --help) echo "$USAGE"; exit 0 ;;
  *) usage_error "unknown subcommand: $SUB" ;;
esac

# shellcheck disable=SC2088  # the ~ is the worker's home: it expands there, not here
TPU="" ZONE="" PROJECT="" NUM_SLICES=1 REPO_DIR="~/spectron-jax" DRY_RUN=0 INTERNAL_IP=0
ACCELERATOR="" RUNTIME="" TIER="" GIT_URL="" REF="HEAD" BASE_PYTHON="python3.11"
PYTHON=".venv/bin/python" COORDINATOR="" MEGASCALE_PORT=8080 FOLLOW=1 SLICE=0 WORKER=0
SIGNAL=TERM
ENVS=()
need() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || usage_error "$1 needs a value"; }
set_tier() { [[ -z "$TIER" || "$TIER" == "$1" ]] || usage_error "$TIER and $1 exclude each other"; TIER="$1"; }
while [[ $# -gt 0 ]]; do
  case "$1" in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
  case "$1" in
    --tpu) need "$@"; TPU="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --num_slices) need "$@"; NUM_SLICES="$2"; shift 2 ;;
    --repo_dir) need "$@"; REPO_DIR="$2"; shift 2 ;;
    --accelerator | --accelerator_type | --accelerator-type) need "$@"; ACCELERATOR="$2"; shift 2 ;;
    --runtime | --runtime_version | --runtime-version) need "$@"; RUNTIME="$2"; shift 2 ;;
    --spot | --best-effort | --best_effort | --reserved) set_tier "${1//_/-}"; shift ;;
    --git_url) need "$@"; GIT_URL="$2"; shift 2 ;;
    --ref) need "$@"; REF="$2"; shift 2 ;;
    --base_python) need "$@"; BASE_PYTHON="$2"; shift 2 ;;
    --python) need "$@"; PYTHON="$2"; shift 2 ;;
    --env) need "$@"; ENVS+=("$2"); shift 2 ;;
    --coordinator) need "$@"; COORDINATOR="$2"; shift 2 ;;
    --megascale_port) need "$@"; MEGASCALE_PORT="$2"; shift 2 ;;
    --no_follow) FOLLOW=0; shift ;;
    --slice) need "$@"; SLICE="$2"; shift 2 ;;
    --worker) need "$@"; WORKER="$2"; shift 2 ;;
    --signal) need "$@"; SIGNAL="$2"; shift 2 ;;
    --internal_ip) INTERNAL_IP=1; shift ;;
    --dry-run | --dry_run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) usage_error "unknown argument: $1 (train flags go after --)" ;;
  esac
done
[[ $# -eq 0 || "$SUB" == train ]] || usage_error "$SUB takes no train flags: $*"

[[ -n "$TPU" ]] || usage_error "missing --tpu NAME"
[[ -n "$ZONE" ]] || usage_error "missing --zone ZONE"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || usage_error "--num_slices must be a positive integer: $NUM_SLICES"
[[ "$SLICE" =~ ^[0-9]+$ && "$SLICE" -lt "$NUM_SLICES" ]] ||
  usage_error "--slice must be one of 0..$((NUM_SLICES - 1)): $SLICE"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || usage_error "--worker must be a number or all: $WORKER"
[[ "$MEGASCALE_PORT" =~ ^[0-9]+$ ]] || usage_error "--megascale_port must be a number: $MEGASCALE_PORT"
# The remote commands leave REPO_DIR unquoted so that ~ expands on the worker.
safe_path='^[A-Za-z0-9_./~-]+$'
[[ "$REPO_DIR" =~ $safe_path ]] || usage_error "--repo_dir may hold only letters, digits and _ . / ~ -: $REPO_DIR"
[[ "$BASE_PYTHON" =~ $safe_path ]] || usage_error "--base_python may hold only letters, digits and _ . / ~ -: $BASE_PYTHON"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants KEY=VALUE: $kv"
done
if [[ "$SUB" == create ]]; then
  [[ -n "$ACCELERATOR" ]] || usage_error "create needs --accelerator TYPE (e.g. v5p-64)"
  [[ -n "$RUNTIME" ]] || usage_error "create needs --runtime VERSION (e.g. v2-alpha-tpuv5)"
fi

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
# gcloud ARGS...: the full command line, with --project when one was given, in GCLOUD.
gcloud_argv() {
  GCLOUD=(gcloud "$@")
  if [[ -n "$PROJECT" ]]; then GCLOUD+=(--project "$PROJECT"); fi
}
gc() { gcloud_argv "$@"; run "${GCLOUD[@]}"; }
# Shell-quoted words, for a command line that a shell on the worker reads again.
quote() {
  local out="" word
  for word in "$@"; do out+=" $(printf '%q' "$word")"; done
  printf '%s' "${out# }"
}
node() { if [[ "$NUM_SLICES" == 1 ]]; then echo "$TPU"; else echo "$TPU-$1"; fi; }
# ssh NODE WORKER COMMAND: COMMAND runs in the login shell of the worker(s).
ssh_to() {
  local args=(compute tpus tpu-vm ssh "$1" --zone "$ZONE" "--worker=$2")
  if [[ "$INTERNAL_IP" == 1 ]]; then args+=(--internal-ip); fi
  gc "${args[@]}" --command "$3"
}
worker_sh() { echo "cd $REPO_DIR && bash launch/tpu/worker.sh"; }

case "$SUB" in
  create)
    args=(compute tpus queued-resources create "$TPU" --zone "$ZONE"
      --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME")
    if [[ "$NUM_SLICES" == 1 ]]; then
      args+=(--node-id "$TPU")
    else
      args+=(--node-count "$NUM_SLICES" --node-prefix "$TPU")
    fi
    if [[ -n "$TIER" ]]; then args+=("$TIER"); fi
    # --best-effort is offered by the alpha track of gcloud only.
    if [[ "$TIER" == --best-effort ]]; then args=(alpha "${args[@]}"); fi
    gc "${args[@]}"
    ;;
  status)
    gc compute tpus queued-resources describe "$TPU" --zone "$ZONE"
    ;;
  wait)
    gcloud_argv compute tpus queued-resources describe "$TPU" --zone "$ZONE" --format 'value(state.state)'
    if [[ "$DRY_RUN" == 1 ]]; then
      run "${GCLOUD[@]}"
      exit 0
    fi
    while true; do
      state="$("${GCLOUD[@]}")"
      echo "$(date +%H:%M:%S) $TPU: $state"
      case "$state" in
        ACTIVE) exit 0 ;;
        FAILED | SUSPENDING | SUSPENDED) exit 1 ;;
      esac
      sleep 30
    done
    ;;
  install)
    venv="{ $BASE_PYTHON -c 'import ensurepip' 2>/dev/null || { sudo apt-get -qq -o DPkg::Lock::Timeout=300 update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 install -y $BASE_PYTHON $BASE_PYTHON-venv; }; }"
    venv+=" && $BASE_PYTHON -m venv .venv && .venv/bin/pip install -q -U pip"
    venv+=" && .venv/bin/pip install -e '.[tpu]' -c constraints.txt"
    if [[ -n "$GIT_URL" ]]; then
      # REF HEAD is the default branch of GIT_URL; fetching by name also updates an old clone.
      fetch="{ [ -d $REPO_DIR/.git ] || git clone -q $(quote "$GIT_URL") $REPO_DIR ; } && cd $REPO_DIR"
      fetch+=" && git fetch -q origin $(quote "$REF") && git checkout -q FETCH_HEAD"
      for ((i = 0; i < NUM_SLICES; i++)); do ssh_to "$(node "$i")" all "$fetch && $venv"; done
    else
      tarball="${TMPDIR:-/tmp}/spectron-jax-src.tar.gz"
      remote_tarball=/tmp/spectron-jax-src.tar.gz
      if [[ "$DRY_RUN" == 0 && -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]]; then
        echo "tpu.sh: uncommitted changes stay behind: this copies 'git archive $REF'" >&2
      fi
      run git -C "$ROOT" archive --format=tar.gz -o "$tarball" "$REF"
      unpack="mkdir -p $REPO_DIR && tar -xzf $remote_tarball -C $REPO_DIR && rm -f $remote_tarball && cd $REPO_DIR"
      for ((i = 0; i < NUM_SLICES; i++)); do
        args=(compute tpus tpu-vm scp "$tarball" "$(node "$i"):$remote_tarball" --zone "$ZONE" --worker=all)
        if [[ "$INTERNAL_IP" == 1 ]]; then args+=(--internal-ip); fi
        gc "${args[@]}"
        ssh_to "$(node "$i")" all "$unpack && $venv"
      done
    fi
    ;;
  train)
    envs=(${ENVS[@]+"${ENVS[@]}"})
    if [[ "$NUM_SLICES" -gt 1 && -z "$COORDINATOR" ]]; then
      gcloud_argv compute tpus tpu-vm describe "$(node 0)" --zone "$ZONE" \
        --format 'value(networkEndpoints[0].ipAddress)'
      if [[ "$DRY_RUN" == 1 ]]; then
        run "${GCLOUD[@]}"
        COORDINATOR=SLICE0_WORKER0_IP
      else
        COORDINATOR="$("${GCLOUD[@]}")"
        [[ -n "$COORDINATOR" ]] || { echo "tpu.sh: no address for $(node 0) worker 0" >&2; exit 1; }
      fi
    fi
    for ((i = 0; i < NUM_SLICES; i++)); do
      slice_envs=()
      if [[ "$NUM_SLICES" -gt 1 ]]; then
        # What libtpu joins the slices with; jax.distributed reads them too (process ids run
        # slice by slice, the coordinator is slice 0 worker 0).
        slice_envs=("MEGASCALE_COORDINATOR_ADDRESS=$COORDINATOR:$MEGASCALE_PORT"
          "MEGASCALE_NUM_SLICES=$NUM_SLICES" "MEGASCALE_SLICE_ID=$i" "MEGASCALE_PORT=$MEGASCALE_PORT")
      fi
      all_envs=(${slice_envs[@]+"${slice_envs[@]}"} ${envs[@]+"${envs[@]}"})
      # --distributed: jax.distributed finds the workers from the TPU metadata.
      cmd=("$PYTHON" -m spectron_jax.train --distributed "$@")
      if [[ ${#all_envs[@]} -gt 0 ]]; then cmd=(env "${all_envs[@]}" "${cmd[@]}"); fi
      ssh_to "$(node "$i")" all "$(worker_sh) start $(quote "${cmd[@]}")"
    done
    if [[ "$FOLLOW" == 1 ]]; then ssh_to "$(node 0)" 0 "$(worker_sh) logs"; fi
    ;;
  logs)
    if [[ "$WORKER" == all ]]; then
      ssh_to "$(node "$SLICE")" all "$(worker_sh) logs --prefix"
    else
      ssh_to "$(node "$SLICE")" "$WORKER" "$(worker_sh) logs"
    fi
    ;;
  stop)
    for ((i = 0; i < NUM_SLICES; i++)); do
      ssh_to "$(node "$i")" all "$(worker_sh) stop $(quote "$SIGNAL")"
    done
    ;;
  delete)
    gc compute tpus queued-resources delete "$TPU" --zone "$ZONE" --force
    ;;
esac
