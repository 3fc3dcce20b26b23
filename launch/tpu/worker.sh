#!/usr/bin/env bash
# Runs on each TPU VM worker, from the repository root; launch/tpu/tpu.sh calls it over ssh.
#
#   worker.sh start CMD...      start CMD detached, its output appended to train.log
#   worker.sh stop [SIGNAL]     signal it (default TERM) and wait until it has exited
#   worker.sh logs [--prefix]   follow train.log (--prefix: each line starts with the hostname)
set -euo pipefail

LOG="train.log" PID_FILE="train.pid"
# A zombie counts as gone: where PID 1 does not reap (some containers) an exited run stays one.
alive() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }
running() { [[ -f "$PID_FILE" ]] && alive "$(cat "$PID_FILE")"; }

case "${1:-}" in
  start)
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 start CMD..." >&2; exit 2; }
    # A second run would find the TPU held by the first and fail with a less helpful message.
    if running; then
      echo "$(hostname): training already running (pid $(cat "$PID_FILE")); stop it first" >&2
      exit 1
    fi
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname): $*" >> "$LOG"
    # Its own session: the ssh session ending does not hang it up, and stop can signal the
    # whole process group. setsid does not fork here (a background job of a non-interactive
    # shell is no group leader), so $! is the trainer itself.
    setsid nohup "$@" >> "$LOG" 2>&1 < /dev/null &
    echo $! > "$PID_FILE"
    echo "$(hostname): started pid $!, log $PWD/$LOG"
    ;;
  stop)
    sig="${2:-TERM}"
    if ! running; then
      echo "$(hostname): no training running"
      exit 0
    fi
    pid="$(cat "$PID_FILE")"
    kill -s "$sig" -- "-$pid"
    # On SIGTERM train() saves a checkpoint before it exits; waiting here means a delete run
    # right after stop does not cut that save short.
    for _ in $(seq 600); do
      alive "$pid" || break
      sleep 1
    done
    if alive "$pid"; then
      echo "$(hostname): pid $pid still running after 10 minutes; try: stop --signal KILL" >&2
      exit 1
    fi
    # libtpu killed with SIGKILL leaves its lock behind, and the next run would find the TPU busy.
    if [[ "$sig" == KILL || "$sig" == 9 ]]; then rm -f /tmp/libtpu_lockfile; fi
    echo "$(hostname): stopped pid $pid"
    ;;
  logs)
    if [[ "${2:-}" == --prefix ]]; then
      tail -n 100 -F "$LOG" | sed -u "s/^/$(hostname): /"
    else
      tail -n 100 -F "$LOG"
    fi
    ;;
  *)
    echo "usage: $0 start CMD... | stop [SIGNAL] | logs [--prefix]" >&2
    exit 2
    ;;
esac
