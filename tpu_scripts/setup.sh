#!/usr/bin/env bash
# Set up every worker of a TPU VM / pod slice: put this repository at REMOTE_DIR, create REMOTE_DIR/.venv with
# PYTHON and `pip install -e '.[tpu]'` (jax[tpu] with libtpu), on all workers at once (`--worker=all`).
# Run it again after changing the code: it replaces the copy and reinstalls.
#
# Usage: tpu_scripts/setup.sh [--dry-run] [-h | --help]
#
# Source of the code, one of:
#   - REPO_URL set: each worker clones REPO_URL (or fetches, when already cloned) and checks out REPO_REF.
#   - REPO_URL unset: the committed HEAD of this checkout is packed with `git archive` into
#     ${TMPDIR:-/tmp}/qednano_jax-TPU_NAME.tar.gz, copied to every worker (`tpu-vm scp --worker=all`) and unpacked.
#     Uncommitted changes are not copied (a warning says so).
# Python: the package needs Python >= 3.11; when PYTHON (default python3.11) or its venv module is missing on a
# worker, `sudo apt-get install PYTHON PYTHON-venv` installs them (the Ubuntu 22.04 TPU images ship 3.10).
#
# Required variables: TPU_NAME, ZONE, PROJECT
# Optional variables:
#   REPO_URL     git URL the workers clone (needs no credentials, or a deploy key on the workers)
#   REPO_REF     commit, tag or remote branch to check out (default: origin/main)
#   REMOTE_DIR   checkout on each worker, relative to the home dir or absolute (default: qednano_jax)
#   PYTHON       interpreter on the workers (default: python3.11)
#   GCLOUD       gcloud binary (default: gcloud)
# Before --worker=all ssh: `ssh-add ~/.ssh/google_compute_engine` (gcloud's note on multi-worker ssh).
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

while (($#)); do
  parse_common "$1" || unknown_arg "$1"
  shift
done

require_vars TPU_NAME ZONE PROJECT
check_name TPU_NAME
need_gcloud
PYTHON="${PYTHON:-python3.11}"
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] || die "PYTHON='$PYTHON': expected an interpreter name like python3.11"
dir=$(quote "$REMOTE_DIR")

# Install PYTHON with its venv module when missing (the lock timeout waits out the unattended upgrades a fresh TPU
# VM runs at boot), then the venv and the package; the last step checks that the package imports.
install="if ! $PYTHON -c 'import ensurepip' >/dev/null 2>&1; then sudo apt-get update -qq"
install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600"
install+=" $PYTHON $PYTHON-venv"
install+="; fi"
install+="; cd $dir && $PYTHON -m venv .venv && .venv/bin/pip install -q -U pip"
install+=" && .venv/bin/pip install -q -e '.[tpu]'"
install+=" && .venv/bin/python -c 'import jax, qednano_jax; print(\"qednano_jax ready, jax\", jax.__version__)'"

if [[ -n ${REPO_URL:-} ]]; then
  REPO_REF="${REPO_REF:-origin/main}"
  url=$(quote "$REPO_URL")
  ref=$(quote "$REPO_REF")
  say "on every worker of '$TPU_NAME': clone/fetch $REPO_URL at $REPO_REF into ~/$REMOTE_DIR, venv with $PYTHON," \
    "pip install -e '.[tpu]'"
  script="set -eu; if [ -d $dir/.git ]; then git -C $dir fetch -q origin; else git clone -q $url $dir; fi"
  on_workers all "$script; git -C $dir checkout -q --detach $ref; $install"
else
  repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")/.." rev-parse --show-toplevel 2>/dev/null) ||
    die "not inside a git checkout: set REPO_URL so the workers clone the code"
  archive="${TMPDIR:-/tmp}/qednano_jax-$TPU_NAME.tar.gz"
  if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    say "warning: uncommitted changes in $repo are NOT copied (git archive HEAD); commit them first"
  fi
  say "copy the committed HEAD of $repo to ~/$REMOTE_DIR on every worker of '$TPU_NAME', venv with $PYTHON," \
    "pip install -e '.[tpu]'"
  run git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
  gcloud_tpu tpu-vm scp "$archive" "$TPU_NAME:qednano_jax-src.tar.gz" --zone="$ZONE" --project="$PROJECT" --worker=all
  # Unpack into a fresh tree (files deleted here disappear there too) that keeps the existing .venv.
  new=$(quote "$REMOTE_DIR.new")
  script="set -eu; rm -rf $new && mkdir -p $new && tar -xzf qednano_jax-src.tar.gz -C $new"
  script+="; if [ -d $dir/.venv ]; then mv $dir/.venv $new/; fi; rm -rf $dir && mv $new $dir"
  on_workers all "$script && rm qednano_jax-src.tar.gz; $install"
fi
say "next: tpu_scripts/launch.sh -- python -m qednano_jax.train configs/sft.yaml ..."
