#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (one TPU VM per host), directly or through a queued resource.
#
# Usage: tpu_scripts/create.sh [--queued] [--spot | --preemptible | --reserved] [--dry-run] [-h | --help]
#
#   --queued       request the slice as a queued resource (`gcloud compute tpus queued-resources create`); the
#                  request waits for capacity; watch it with tpu_scripts/status.sh --queued. The node it creates
#                  is named TPU_NAME, so the other scripts work on it unchanged.
#   --spot         spot capacity: cheaper, may be preempted at any time (then re-create and resume from the last
#                  checkpoint: runs resume from checkpoint.dir)
#   --preemptible  legacy preemptible capacity (TPU VM only; queued resources take --spot)
#   --reserved     use the project's reservation
#   --dry-run      print the exact gcloud command and run nothing
#
# Required variables:
#   TPU_NAME          name of the TPU VM / slice, e.g. qednano-v5p-64
#   ZONE              zone with capacity for the accelerator, e.g. us-east5-a
#   PROJECT           Google Cloud project id
#   ACCELERATOR_TYPE  e.g. v5p-64, v6e-32, v5litepod-16, v4-32 (configs/tpu.yaml: generations and their numbers)
#   RUNTIME_VERSION   TPU software version: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p),
#                     v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4)
# Optional variables:
#   QUEUED_RESOURCE   queued-resource id with --queued (default: TPU_NAME-qr)
#   NETWORK, SUBNETWORK, SERVICE_ACCOUNT   passed to gcloud as --network/--subnetwork/--service-account
#   GCLOUD            gcloud binary (default: gcloud)
#
# Example:
#   TPU_NAME=qednano ZONE=us-east5-a PROJECT=my-proj ACCELERATOR_TYPE=v5p-64 RUNTIME_VERSION=v2-alpha-tpuv5 \
#     tpu_scripts/create.sh --spot --dry-run
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=0
capacity=""
while (($#)); do
  case $1 in
    --queued) queued=1 ;;
    --spot | --preemptible | --reserved)
      [[ -z $capacity || $capacity == "$1" ]] ||
        die "choose one of --spot, --preemptible, --reserved (got $capacity and $1)"
      capacity=$1 ;;
    *) parse_common "$1" || unknown_arg "$1" ;;
  esac
  shift
done

require_vars TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION
check_name TPU_NAME
need_gcloud
optional=()
[[ -n $capacity ]] && optional+=("$capacity")
[[ -n ${NETWORK:-} ]] && optional+=("--network=$NETWORK")
[[ -n ${SUBNETWORK:-} ]] && optional+=("--subnetwork=$SUBNETWORK")
[[ -n ${SERVICE_ACCOUNT:-} ]] && optional+=("--service-account=$SERVICE_ACCOUNT")

if ((queued)); then
  [[ $capacity != --preemptible ]] || die "--preemptible is not available for queued resources; use --spot"
  QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME-qr}"
  check_name QUEUED_RESOURCE
  say "request queued resource '$QUEUED_RESOURCE' for TPU '$TPU_NAME'" \
    "($ACCELERATOR_TYPE, runtime $RUNTIME_VERSION${capacity:+, ${capacity#--}}) in $ZONE, project $PROJECT"
  gcloud_tpu queued-resources create "$QUEUED_RESOURCE" --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" --node-id="$TPU_NAME" \
    ${optional[@]+"${optional[@]}"}
  say "queued; check its state with: tpu_scripts/status.sh --queued (ACTIVE = ready; then tpu_scripts/setup.sh)"
else
  say "create TPU VM '$TPU_NAME' ($ACCELERATOR_TYPE, runtime $RUNTIME_VERSION${capacity:+, ${capacity#--}})" \
    "in $ZONE, project $PROJECT"
  gcloud_tpu tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${optional[@]+"${optional[@]}"}
  say "next: tpu_scripts/setup.sh"
fi
