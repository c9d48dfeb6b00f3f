# shellcheck shell=bash
# Shared helpers for the msjax TPU / GPU-host scripts. Sourced by every script, never run.
#
# Conventions: options take `--opt value` or `--opt=value`; a bare `--` ends the script's options
# and the rest goes to msjax-train / msjax-aot; --dry-run prints every command (shell-quoted, one
# per line on stdout) instead of running it; usage errors exit 2.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "$0 needs bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

DRY_RUN=0
TPU_NAME=${MSJAX_TPU_NAME:-}
ZONE=${MSJAX_TPU_ZONE:-}
PROJECT=${MSJAX_GCP_PROJECT:-}
POLL_S=${MSJAX_POLL_S:-30}
SCRIPT=$(basename "$0")

die() {
  echo "$SCRIPT: error: $*" >&2
  exit 2
}

note() {
  echo "[$SCRIPT] $*" >&2
}

# Quote one word for a shell command line; plain words stay bare.
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# All arguments as one shell command line.
join_quoted() {
  local out=() word
  for word in "$@"; do
    out+=("$(shell_quote "$word")")
  done
  printf '%s' "${out[*]}"
}

# Run a command, or print it under --dry-run.
run() {
  if ((DRY_RUN)); then
    join_quoted "$@"
    echo
  else
    "$@"
  fi
}

# Run a command with its output also appended to log file $1 (or print it under --dry-run).
run_logged() {
  local log=$1
  shift
  if ((DRY_RUN)); then
    echo "$(join_quoted "$@") 2>&1 | tee -a $(shell_quote "$log")"
  else
    mkdir -p "$(dirname "$log")"
    "$@" 2>&1 | tee -a "$log"
  fi
}

# shellcheck disable=SC2034  # ARGS is read by the sourcing script
# ARGS := "$@" with each --opt=value before a bare -- split into --opt value.
split_args() {
  ARGS=()
  local rest=0 arg
  for arg in "$@"; do
    if ((rest == 0)) && [[ $arg == --*=* ]]; then
      ARGS+=("${arg%%=*}" "${arg#*=}")
    else
      ARGS+=("$arg")
    fi
    if [[ $arg == -- ]]; then
      rest=1
    fi
  done
}

# Value of option $1 in "$@" = (--opt value ...); use as X=$(need_value "$@").
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    die "option $1 needs a value (see --help)"
  fi
  printf '%s' "$2"
}

# Handle the options every TPU script shares; SHIFT_N := words used (0 = not a shared option).
# shellcheck disable=SC2034  # SHIFT_N is read by the sourcing script
common_option() {
  SHIFT_N=2
  case $1 in
    --name) TPU_NAME=$(need_value "$@") ;;
    --zone) ZONE=$(need_value "$@") ;;
    --project) PROJECT=$(need_value "$@") ;;
    --dry-run) DRY_RUN=1 SHIFT_N=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) SHIFT_N=0 ;;
  esac
}

# Die unless value $1 is set; $2 names the option.
require() {
  if [[ -z $1 ]]; then
    die "missing $2 (see --help)"
  fi
}

# Check --name/--zone and gcloud; GCLOUD_SCOPE := the zone/project flags for gcloud.
require_tpu() {
  require "$TPU_NAME" "--name NAME (or MSJAX_TPU_NAME)"
  require "$ZONE" "--zone ZONE (or MSJAX_TPU_ZONE)"
  GCLOUD_SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    GCLOUD_SCOPE+=(--project="$PROJECT")
  fi
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud SDK, or use --dry-run to see the commands"
  fi
}

# Accelerator type as gcloud spells it (v5e-8 -> v5litepod-8); dies on a malformed name.
accelerator_type() {
  if [[ ! $1 =~ ^(v2|v3|v4|v5e|v5litepod|v5p|v6e)-([0-9]+)$ ]]; then
    die "accelerator '$1' is not a TPU type like v4-32, v5e-8, v5p-64 or v6e-8"
  fi
  if [[ ${BASH_REMATCH[1]} == v5e ]]; then
    printf 'v5litepod-%s' "${BASH_REMATCH[2]}"
  else
    printf '%s' "$1"
  fi
}

# Default TPU software version for an accelerator type.
default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# Run shell command $2 on TPU worker(s) $1 (an index, a list, or "all").
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --worker="$1" --command "$2"
}

# State of the queued resource (ACTIVE, SUSPENDED, ...); empty when it does not exist.
# Under --dry-run it prints the query instead (do not capture it then).
queued_state() {
  local cmd=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${GCLOUD_SCOPE[@]}"
    --format='value(state.state)')
  if ((DRY_RUN)); then
    run "${cmd[@]}"
  else
    "${cmd[@]}" 2>/dev/null || true
  fi
}

# Block until the queued resource is ACTIVE; die if it fails or is suspended first.
wait_active() {
  local state last=""
  if ((DRY_RUN)); then
    echo "# wait until queued resource $TPU_NAME is ACTIVE, polling every ${POLL_S}s:"
    queued_state
    return 0
  fi
  while true; do
    state=$(queued_state)
    if [[ $state != "$last" ]]; then
      note "queued resource $TPU_NAME: ${state:-absent}"
      last=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | "") die "queued resource $TPU_NAME is ${state:-absent}" ;;
    esac
    sleep "$POLL_S"
  done
}
