#!/usr/bin/env bash
# Delete a Cloud TPU VM / pod slice, or a queued resource together with the slice it created.
# The disks of the TPU VMs go with it: keep checkpoints and exports on gs:// (checkpoint.dir, train.run_dir).
#
# Usage: tpu_scripts/delete.sh [--queued] [--yes] [--dry-run] [-h | --help]
#
#   --queued   delete the queued resource QUEUED_RESOURCE and its node (`queued-resources delete --force`)
#   --yes      do not ask for confirmation (passes --quiet to gcloud)
#   --dry-run  print the exact gcloud command and run nothing
#
# Required variables: TPU_NAME, ZONE, PROJECT
# Optional variables: QUEUED_RESOURCE (with --queued; default TPU_NAME-qr), GCLOUD (gcloud binary)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=0
yes=()
while (($#)); do
  case $1 in
    --queued) queued=1 ;;
    --yes) yes=(--quiet) ;;
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
  say "delete queued resource '$QUEUED_RESOURCE' and its TPU '$TPU_NAME' in $ZONE, project $PROJECT"
  gcloud_tpu queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" --project="$PROJECT" --force \
    ${yes[@]+"${yes[@]}"}
else
  say "delete TPU VM '$TPU_NAME' in $ZONE, project $PROJECT (its local disks are lost)"
  gcloud_tpu tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" ${yes[@]+"${yes[@]}"}
fi
