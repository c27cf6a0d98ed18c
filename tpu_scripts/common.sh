# Shared helpers for tpu_scripts/*.sh (sourced, never run). Not a command of its own.
#
# Every script: prints what it will do (lines starting `==>` on stderr), refuses missing variables naming them all,
# supports --dry-run (prints the exact commands on stdout, one per line, quoted like Python's shlex.quote so they
# can be copy-pasted, and runs nothing) and -h/--help (prints the script's header comment).
#
# Variables read here: GCLOUD (the gcloud binary; default `gcloud`), TPU_NAME, ZONE, PROJECT (checked by the
# scripts that need them), REMOTE_DIR (checkout on each worker; default `qednano_jax`, relative to the home dir).
# shellcheck shell=bash

DRY_RUN=0
GCLOUD="${GCLOUD:-gcloud}"
REMOTE_DIR="${REMOTE_DIR:-qednano_jax}"
_GCLOUD_CHECKED=0

die() {  # die MESSAGE: print `error: MESSAGE` and exit 2
  echo "error: $*" >&2
  exit 2
}

say() {  # say MESSAGE: describe a step (stderr, so --dry-run stdout holds commands only)
  echo "==> $*" >&2
}

print_help() {  # the calling script's header comment, without the leading `# `
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

quote() {  # quote WORD: one shell word, quoted exactly like Python's shlex.quote
  local s=$1 sq="'\"'\"'" LC_ALL=C  # C: the character class means ASCII only, as in shlex
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$sq}"
  fi
}

join_quoted() {  # join_quoted WORD...: the words quoted and joined by spaces (like shlex.join)
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

require_vars() {  # require_vars NAME...: exit 2 naming every unset/empty variable among NAME...
  local missing=() v
  for v in "$@"; do
    [[ -n ${!v:-} ]] || missing+=("$v")
  done
  if ((${#missing[@]})); then
    die "missing required variable(s): ${missing[*]} (export them, e.g. \`export ${missing[0]}=...\`; see --help)"
  fi
}

check_name() {  # check_name VAR: the variable's value must be a plain name (letters, digits, . _ -)
  [[ ${!1} =~ ^[A-Za-z0-9._-]+$ ]] || die "$1='${!1}': use only letters, digits, '.', '_' and '-'"
}

need_gcloud() {  # fail clearly (before anything runs) when the gcloud CLI is not installed
  ((DRY_RUN || _GCLOUD_CHECKED)) && return 0
  command -v "$GCLOUD" >/dev/null 2>&1 ||
    die "gcloud not found (GCLOUD=$GCLOUD): install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)," \
      "or set GCLOUD to its path; --dry-run prints the commands without it"
  _GCLOUD_CHECKED=1
}

run() {  # run CMD...: print it (--dry-run: on stdout, and stop there) or print it on stderr and run it
  if ((DRY_RUN)); then
    join_quoted "$@"
    printf '\n'
    return 0
  fi
  printf '+ %s\n' "$(join_quoted "$@")" >&2
  "$@"
}

gcloud_tpu() {  # gcloud_tpu ARGS...: `gcloud compute tpus ARGS...`
  need_gcloud
  run "$GCLOUD" compute tpus "$@"
}

on_workers() {  # on_workers WORKER SCRIPT [EXTRA...]: run the one-line shell SCRIPT on TPU_NAME's worker(s)
  local worker=$1 script=$2
  shift 2
  gcloud_tpu tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker="$worker" --command="$script" "$@"
}

# Worker-side sh: is process $1 running? (A zombie is not: some containers' pid 1 never reaps orphans.)
# shellcheck disable=SC2016,SC2034  # expands on the worker; used by the scripts that source this file
REMOTE_ALIVE='alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q Z; }'

parse_common() {  # parse_common ARG: handle --dry-run / -h / --help; returns 1 for anything else
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) print_help; exit 0 ;;
    *) return 1 ;;
  esac
}

unknown_arg() {
  die "unknown argument '$1' (see $(basename "$0") --help)"
}
