#!/usr/bin/env bash
# Follow or fetch the logs of a run started by launch.sh (each worker writes its own ~/LOG_DIR/RUN_NAME.log).
#
# Usage: tpu_scripts/logs.sh [--worker N] [--lines N] [--fetch DIR] [--dry-run] [-h | --help]
#
#   (default)      follow worker 0's log (`tail -F`; Ctrl-C stops following, the run goes on)
#   --worker N     follow worker N instead (its own view: loss and metrics are logged by process 0 only)
#   --lines N      lines of history to show first (default 100)
#   --fetch DIR    copy every worker's whole log into DIR/<worker>.log (gcloud's --output-directory) and exit
#   --dry-run      print the exact commands and run nothing
#
# Required variables: TPU_NAME, ZONE, PROJECT, RUN_NAME
# Optional variables: LOG_DIR (default qednano_logs, as in launch.sh), GCLOUD (gcloud binary)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

worker=0
lines=100
fetch=""
while (($#)); do
  case $1 in
    --worker | --lines | --fetch)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --worker) worker=$2 ;;
        --lines) lines=$2 ;;
        --fetch) fetch=$2 ;;
      esac
      shift ;;
    *) parse_common "$1" || unknown_arg "$1" ;;
  esac
  shift
done
[[ $worker =~ ^[0-9]+$ ]] || die "--worker '$worker': expected a worker number (0, 1, ...)"
[[ $lines =~ ^[0-9]+$ ]] || die "--lines '$lines': expected a number"

require_vars TPU_NAME ZONE PROJECT RUN_NAME
check_name TPU_NAME
need_gcloud
check_name RUN_NAME
LOG_DIR="${LOG_DIR:-qednano_logs}"
log="$(quote "$LOG_DIR")/$RUN_NAME.log"

if [[ -n $fetch ]]; then
  say "fetch ~/$LOG_DIR/$RUN_NAME.log from every worker of '$TPU_NAME' into $fetch/<worker>.log"
  run mkdir -p "$fetch"
  on_workers all "cat $log" --output-directory="$fetch"
else
  say "follow ~/$LOG_DIR/$RUN_NAME.log on worker $worker of '$TPU_NAME' (Ctrl-C stops following; the run goes on)"
  on_workers "$worker" "tail -n $lines -F $log"
fi
