#!/usr/bin/env bash
# Show the state of a TPU VM / pod slice (READY, CREATING, PREEMPTED, ...) or of a queued resource
# (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, SUSPENDED, ...).
#
# Usage: tpu_scripts/status.sh [--queued] [--dry-run] [-h | --help]
#
#   --queued   describe the queued resource QUEUED_RESOURCE instead of the TPU VM
#   --dry-run  print the exact gcloud command and run nothing
#
# Required variables: TPU_NAME, ZONE, PROJECT
# Optional variables: QUEUED_RESOURCE (with --queued; default TPU_NAME-qr), GCLOUD (gcloud binary)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=0
while (($#)); do
  case $1 in
    --queued) queued=1 ;;
    *) parse_common "$1" || unknown_arg "$1" ;;
  esac
  shift
done

require_vars TPU_NAME ZONE PROJECT
check_name TPU_NAME
need_gcloud
if ((queued)); then
  QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME-qr}"
  check_name QUEUED_RESOURCE
  say "describe queued resource '$QUEUED_RESOURCE' in $ZONE, project $PROJECT"
  gcloud_tpu queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" --project="$PROJECT"
else
  say "describe TPU VM '$TPU_NAME' in $ZONE, project $PROJECT"
  gcloud_tpu tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
fi
