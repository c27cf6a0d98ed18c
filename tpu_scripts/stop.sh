#!/usr/bin/env bash
# Stop a run started by launch.sh on every worker: SIGTERM to its process group (pid in ~/LOG_DIR/RUN_NAME.pid),
# then SIGKILL after --timeout seconds if it is still alive. A stopped run continues from its last checkpoint when
# launched again with the same config (same train.run_dir).
#
# Usage: tpu_scripts/stop.sh [--timeout SECONDS] [--pattern PATTERN] [--dry-run] [-h | --help]
#
#   --timeout S        seconds to wait after SIGTERM before SIGKILL (default 30)
#   --pattern PATTERN  instead of the pid file, stop every process whose command line matches PATTERN (`pgrep -f`)
#                      on every worker (SIGTERM, then SIGKILL), e.g.
#                      for processes started by hand that still hold the TPU ("TPU in use" on the next launch)
#   --dry-run          print the exact gcloud command and run nothing
#
# Required variables: TPU_NAME, ZONE, PROJECT, and RUN_NAME (unless --pattern)
# Optional variables: LOG_DIR (default qednano_logs, as in launch.sh), GCLOUD (gcloud binary)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

timeout=30
pattern=""
while (($#)); do
  case $1 in
    --timeout | --pattern)
      (($# >= 2)) || die "$1 needs a value"
      if [[ $1 == --timeout ]]; then timeout=$2; else pattern=$2; fi
      shift ;;
    *) parse_common "$1" || unknown_arg "$1" ;;
  esac
  shift
done
[[ $timeout =~ ^[0-9]+$ ]] || die "--timeout '$timeout': expected a number of seconds"

# shellcheck disable=SC2016  # $... in single quotes expand on the worker
wait_kill='i=0; while alive "$pid" && [ $i -lt '"$timeout"' ]; do sleep 1; i=$((i+1)); done'
# shellcheck disable=SC2016
me='worker $(hostname)'
if [[ -n $pattern ]]; then
  require_vars TPU_NAME ZONE PROJECT
  check_name TPU_NAME
  need_gcloud
  p=$(quote "$pattern")
  say "on every worker of '$TPU_NAME': stop the processes matching pgrep -f $p (SIGTERM, SIGKILL after ${timeout}s)"
  # This script's own shell (and its subshells) carry the pattern in their command line too: skip every process
  # whose command line holds the marker `qednano-stop-self` (and pgrep's own subshell, gone by the time we look).
  script=": qednano-stop-self; $REMOTE_ALIVE; pids=; for q in \$(pgrep -f $p || true); do c=\$(tr '\\0' ' ' 2>/dev/null"
  script+=" < /proc/\$q/cmdline) || continue; case \"\$c\" in *qednano-stop-self*) ;; *) pids=\"\$pids \$q\" ;; esac"
  script+="; done"
  script+="; if [ -z \"\$pids\" ]; then echo \"$me: no process matches \"$p; exit 0; fi; kill -TERM \$pids || true"
  script+="; for pid in \$pids; do $wait_kill; kill -KILL \"\$pid\" 2>/dev/null || true; done"
  script+="; echo \"$me: stopped\$pids matching \"$p"
else
  require_vars TPU_NAME ZONE PROJECT RUN_NAME
  check_name TPU_NAME
  need_gcloud
  check_name RUN_NAME
  LOG_DIR="${LOG_DIR:-qednano_logs}"
  pidf="$(quote "$LOG_DIR")/$RUN_NAME.pid"
  say "on every worker of '$TPU_NAME': stop run '$RUN_NAME' (SIGTERM to the pid in ~/$LOG_DIR/$RUN_NAME.pid," \
    "SIGKILL after ${timeout}s)"
  script="cd; $REMOTE_ALIVE; if [ ! -f $pidf ]; then echo \"$me: no $pidf; nothing to stop\"; exit 0; fi"
  script+="; pid=\$(cat $pidf)"
  script+="; if alive \"\$pid\"; then kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\""
  script+="; $wait_kill; if alive \"\$pid\"; then kill -KILL -- \"-\$pid\" 2>/dev/null"
  script+=" || kill -KILL \"\$pid\"; fi; echo \"$me: stopped $RUN_NAME (pid \$pid)\""
  script+="; else echo \"$me: $RUN_NAME is not running (pid \$pid)\"; fi; rm -f $pidf"
fi
on_workers all "$script"
