#!/usr/bin/env bash
# Launch one command on every worker of a TPU VM / pod slice (`--worker=all`), as multi-controller JAX: one process
# per host, all running the same program, each feeding its own data shard.
#
# Usage: tpu_scripts/launch.sh [--env KEY=VALUE]... [--foreground] [--dry-run] [-h | --help] -- COMMAND [ARG...]
#   e.g. tpu_scripts/launch.sh -- python -m qednano_jax.train configs/sft.yaml train.run_dir=gs://BUCKET/runs/sft-4b
#
#   --env KEY=VALUE  also export KEY=VALUE for the command (repeatable)
#   --foreground     run attached (output streams back; Ctrl-C ends it) instead of nohup in the background
#   --dry-run        print the exact gcloud command and run nothing
#
# On each worker, from ~/REMOTE_DIR with its .venv activated, the command runs under `setsid nohup` with stdout and
# stderr appended to ~/LOG_DIR/RUN_NAME.log (one log per worker, on that worker; read them with logs.sh) and its
# pid in ~/LOG_DIR/RUN_NAME.pid (used by stop.sh). A worker where RUN_NAME is still running refuses to start it
# again; a worker where it exits within LAUNCH_CHECK_SECONDS prints the end of its log and launch.sh fails.
# Secrets (e.g. the grader's API key) go in ~/.qednano_env on each worker (KEY=VALUE lines, sourced and exported
# when present; copy it with `gcloud compute tpus tpu-vm scp FILE TPU_NAME:.qednano_env --worker=all`), not in
# --env, whose values appear in the printed command. Also exported for the command:
#   RUN_NAME, PYTHONUNBUFFERED=1, JAX_COMPILATION_CACHE_DIR (COMPILATION_CACHE_DIR, or ~/.cache/jax_compilation_cache),
#   and, read from the TPU VM metadata server (the same keys jax's own Cloud TPU detection reads):
#   JAX_PROCESS_ID (agent-worker-number), JAX_NUM_PROCESSES (number of worker-network-endpoints) and
#   JAX_COORDINATOR_ADDRESS (worker 0's address, port 8476); qednano_jax.sharding.maybe_initialize_distributed
#   passes them to jax.distributed.initialize() when JAX_NUM_PROCESSES > 1. (One slice; no Multislice.)
# Paths on gs:// (checkpoints, HF exports, the compilation cache) are passed through unchanged.
#
# Required variables: TPU_NAME, ZONE, PROJECT, RUN_NAME (letters, digits, . _ -; names the log and pid files)
# Optional variables:
#   COMPILATION_CACHE_DIR  persistent XLA compilation cache, e.g. gs://BUCKET/jax-cache (shared by all workers)
#   REMOTE_DIR             checkout on each worker (default: qednano_jax; see setup.sh)
#   LOG_DIR                log folder on each worker, relative to the home dir or absolute (default: qednano_logs)
#   LAUNCH_CHECK_SECONDS   seconds to wait before checking that the command is still running (default: 5)
#   GCLOUD                 gcloud binary (default: gcloud)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

envs=()
foreground=0
while (($#)); do
  case $1 in
    --env)
      (($# >= 2)) || die "--env needs KEY=VALUE"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$2': expected KEY=VALUE with KEY a variable name"
      envs+=("$2")
      shift ;;
    --foreground) foreground=1 ;;
    --) shift; break ;;
    *) parse_common "$1" || unknown_arg "$1" ;;
  esac
  shift
done
(($#)) || die "no command given: tpu_scripts/launch.sh [options] -- COMMAND [ARG...] (see --help)"

require_vars TPU_NAME ZONE PROJECT RUN_NAME
check_name TPU_NAME
need_gcloud
check_name RUN_NAME
LOG_DIR="${LOG_DIR:-qednano_logs}"
LAUNCH_CHECK_SECONDS="${LAUNCH_CHECK_SECONDS:-5}"
[[ $LAUNCH_CHECK_SECONDS =~ ^[0-9]+$ ]] ||
  die "LAUNCH_CHECK_SECONDS='$LAUNCH_CHECK_SECONDS': expected a number of seconds"
command=$(join_quoted "$@")
dir=$(quote "$REMOTE_DIR")
logs=$(quote "$LOG_DIR")
if [[ -n ${COMPILATION_CACHE_DIR:-} ]]; then
  cache=$(quote "$COMPILATION_CACHE_DIR")
else
  # shellcheck disable=SC2016  # expanded on the worker
  cache='"$HOME/.cache/jax_compilation_cache"'
fi
exports="RUN_NAME=$RUN_NAME PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$cache"
for kv in ${envs[@]+"${envs[@]}"}; do
  exports+=" $(quote "$kv")"
done

# The remote script is one line of POSIX sh (it runs in the worker user's login shell).
# shellcheck disable=SC2016  # $... in single quotes expand on the worker, not here
metadata='md() { curl -sf --max-time 5 -H Metadata-Flavor:Google'\
' "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/$1"; }'\
'; if id=$(md agent-worker-number) && eps=$(md worker-network-endpoints); then'\
' n=$(printf %s "$eps" | tr , "\n" | grep -c .); first=${eps%%,*}'\
'; export JAX_PROCESS_ID="$id" JAX_NUM_PROCESSES="$n" JAX_COORDINATOR_ADDRESS="${first##*:}:8476"; fi'
# shellcheck disable=SC2016
whoami='worker ${JAX_PROCESS_ID:-0}/${JAX_NUM_PROCESSES:-1} ($(hostname))'
script="set -eu; cd; mkdir -p $logs; logs=\$(cd $logs && pwd); cd $dir; . .venv/bin/activate; $metadata"
script+="; if [ -f \"\$HOME/.qednano_env\" ]; then set -a; . \"\$HOME/.qednano_env\"; set +a; fi"
script+="; export $exports"
if ((foreground)); then
  script+="; printf '%s\\n' \"$whoami: \"$(quote "$command"); $command"
  what="run in the foreground"
else
  pidf="\"\$logs/$RUN_NAME.pid\""
  logf="\"\$logs/$RUN_NAME.log\""
  script+="; $REMOTE_ALIVE; if [ -f $pidf ] && alive \"\$(cat $pidf)\"; then echo \"$whoami: $RUN_NAME is already"
  script+=" running (pid \$(cat $pidf)); stop it with tpu_scripts/stop.sh\" >&2; exit 1; fi"
  script+="; printf '%s\\n' \"== \$(date -u +%Y-%m-%dT%H:%M:%SZ) $whoami: \"$(quote "$command") >> $logf"
  script+="; setsid nohup $command >> $logf 2>&1 < /dev/null & pid=\$!; echo \$pid > $pidf"
  script+="; sleep $LAUNCH_CHECK_SECONDS; if ! alive \$pid; then echo \"$whoami: $RUN_NAME (pid \$pid) exited within"
  script+=" ${LAUNCH_CHECK_SECONDS}s; the end of \$logs/$RUN_NAME.log:\" >&2; tail -n 20 $logf >&2; exit 1; fi"
  script+="; echo \"$whoami: started pid \$pid, log \$logs/$RUN_NAME.log\""
  what="start in the background (nohup; log ~/$LOG_DIR/$RUN_NAME.log on each worker)"
fi
say "on every worker of '$TPU_NAME', in ~/$REMOTE_DIR with its venv, $what, run '$RUN_NAME': $command"
on_workers all "$script"
if ((!foreground)); then
  say "next: tpu_scripts/logs.sh (follow worker 0), tpu_scripts/logs.sh --fetch DIR (all workers), tpu_scripts/stop.sh"
fi
