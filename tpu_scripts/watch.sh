#!/usr/bin/env bash
# Keep a training run alive on a (spot) TPU: create, set up, launch; after a preemption, recreate
# the TPU and launch again, which resumes from the latest checkpoint in the workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
HERE=$(cd "$(dirname "$0")" && pwd)

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --accelerator TYPE --config CONFIG --workdir gs://BUCKET/RUN
       [create options] [setup options] [launch options] [--max-restarts N] [-- ARGS]

Loop until msjax-train exits 0: make sure the queued resource NAME is ACTIVE (create it when
absent; delete and recreate it when preempted: SUSPENDED or FAILED), install msjax when the TPU is
new, then run launch.sh. Each launch resumes from the workdir's latest checkpoint.

  --name, --zone, --project                    as in create.sh (or the MSJAX_* env variables)
  --accelerator TYPE, --runtime VERSION, --spot | --on-demand | --reserved   passed to create.sh
  --source DIR | --repo URL [--ref REF], --python PYTHON                      passed to setup.sh
  --config CONFIG, --workdir URL, --env KEY=VALUE, --log-dir DIR              passed to launch.sh
  --dir DIR            install directory on the workers (default: msjax)
  --no-setup           skip setup.sh when the TPU already exists at start (it runs after every
                       re-creation anyway)
  --max-restarts N     give up after N failed rounds (create, setup or launch) that were
                       not preemptions (default: 20)
  --poll SECONDS       seconds between state checks (default: 60)
  -- ARGS              more msjax-train flags
  --dry-run            print the commands of one round instead of running them
  -h, --help           this help
USAGE
}

CREATE=() SETUP=() LAUNCH=() EXTRA=() ACCELERATOR="" CONFIG="" WORKDIR=""
MAX_RESTARTS=20 SKIP_SETUP=0 POLL_S=60
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  common_option "$@"
  if ((SHIFT_N)); then
    shift "$SHIFT_N"
    continue
  fi
  case $1 in
    --accelerator) ACCELERATOR=$(need_value "$@"); CREATE+=("$1" "$2"); shift 2 ;;
    --runtime) CREATE+=("$1" "$(need_value "$@")"); shift 2 ;;
    --spot | --on-demand | --reserved) CREATE+=("$1"); shift ;;
    --source | --repo | --ref | --python) SETUP+=("$1" "$(need_value "$@")"); shift 2 ;;
    --config) CONFIG=$(need_value "$@"); LAUNCH+=("$1" "$2"); shift 2 ;;
    --workdir) WORKDIR=$(need_value "$@"); LAUNCH+=("$1" "$2"); shift 2 ;;
    --env | --log-dir) LAUNCH+=("$1" "$(need_value "$@")"); shift 2 ;;
    --dir) SETUP+=("$1" "$(need_value "$@")"); LAUNCH+=("$1" "$2"); shift 2 ;;
    --no-setup) SKIP_SETUP=1; shift ;;
    --max-restarts) MAX_RESTARTS=$(need_value "$@"); shift 2 ;;
    --poll) POLL_S=$(need_value "$@"); shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require_tpu
require "$ACCELERATOR" "--accelerator TYPE"
require "$CONFIG" "--config CONFIG"
require "$WORKDIR" "--workdir gs://BUCKET/RUN"
accelerator_type "$ACCELERATOR" >/dev/null
if [[ ! $MAX_RESTARTS =~ ^[0-9]+$ || ! $POLL_S =~ ^[1-9][0-9]*$ ]]; then
  die "--max-restarts and --poll need whole numbers (got '$MAX_RESTARTS', '$POLL_S')"
fi
export MSJAX_POLL_S=$POLL_S

TPU=(--name "$TPU_NAME" --zone "$ZONE")
if [[ -n $PROJECT ]]; then
  TPU+=(--project "$PROJECT")
fi
if ((DRY_RUN)); then
  TPU+=(--dry-run)
fi
LAUNCH+=(-- "${EXTRA[@]}")

if ((DRY_RUN)); then
  echo "# 1. state of the queued resource:"
  queued_state
  echo "# 2. when absent (or SUSPENDED/FAILED after a preemption: delete first, then create):"
  "$HERE/delete.sh" "${TPU[@]}"
  "$HERE/create.sh" "${TPU[@]}" "${CREATE[@]}" --wait
  echo "# 3. on a new TPU:"
  "$HERE/setup.sh" "${TPU[@]}" "${SETUP[@]}"
  echo "# 4. train (resumes from the workdir); when it fails go back to 1 (at most" \
    "$MAX_RESTARTS failures on an ACTIVE TPU):"
  "$HERE/launch.sh" "${TPU[@]}" "${LAUNCH[@]}"
  exit 0
fi

# One round: make the TPU ACTIVE (recreating it after a preemption), install msjax on a new TPU,
# launch. Returns launch.sh's status; LAUNCHED=1 once the launch has started.
round() {
  local state
  LAUNCHED=0
  state=$(queued_state)
  while [[ $state == DELETING ]]; do
    sleep "$POLL_S"
    state=$(queued_state)
  done
  case $state in
    ACTIVE) ;;
    "" | SUSPENDING | SUSPENDED | FAILED)
      if [[ -n $state ]]; then
        note "queued resource $TPU_NAME is $state (preempted?): recreating it"
        "$HERE/delete.sh" "${TPU[@]}" || return 1
      fi
      "$HERE/create.sh" "${TPU[@]}" "${CREATE[@]}" --wait || return 1
      FRESH=1
      ;;
    *)
      (wait_active) || return 1
      FRESH=1
      ;;
  esac
  if ((FRESH)); then
    "$HERE/setup.sh" "${TPU[@]}" "${SETUP[@]}" || return 1
    FRESH=0
  fi
  LAUNCHED=1
  "$HERE/launch.sh" "${TPU[@]}" "${LAUNCH[@]}"
}

failures=0
FRESH=$((!SKIP_SETUP))
while true; do
  if round; then
    note "msjax-train finished"
    exit 0
  fi
  sleep "$POLL_S"
  if ((LAUNCHED)) && [[ $(queued_state) != ACTIVE ]]; then
    note "the run stopped and $TPU_NAME is no longer ACTIVE (preempted): starting again"
    continue
  fi
  failures=$((failures + 1))
  if ((failures > MAX_RESTARTS)); then
    die "$failures failed rounds on a TPU that was not preempted; giving up (see the logs)"
  fi
  note "round failed ($failures/$MAX_RESTARTS): trying again"
done
