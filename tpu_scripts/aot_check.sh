#!/usr/bin/env bash
# Ahead-of-time check: compile a training config for a TPU topology and report per-chip memory.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --config CONFIG --topology TYPE [--on-worker --name NAME --zone ZONE] [-- ARGS]

Run msjax-aot: compile the train step and the sampler of CONFIG for TPU topology TYPE without
allocating anything, print per-chip memory and FLOPs, and exit non-zero when it does not fit.
Runs locally by default (the TPU compiler from libtpu works on a CPU host); --on-worker runs it
on worker 0 of a TPU instead (CONFIG is then a path inside the install directory there).

  --config CONFIG      ml_collections config file, e.g. experiments/configs/<recipe>.py
  --topology TYPE      TPU type as you would create it: v5p-64, v6e-8, v4-32, v5e-16, ...
  --on-worker          run on worker 0 of TPU NAME (needs --name and --zone)
  --name NAME          TPU name                            (or env MSJAX_TPU_NAME)
  --zone ZONE          its zone                            (or env MSJAX_TPU_ZONE)
  --project PROJECT    GCP project (default: gcloud's)     (or env MSJAX_GCP_PROJECT)
  --dir DIR            msjax install directory on the worker (default: msjax)
  -- ARGS              passed to msjax-aot unchanged (e.g. -- --json)
  --dry-run            print the command instead of running it
  -h, --help           this help
USAGE
}

CONFIG="" TOPOLOGY="" ON_WORKER=0 DIR="msjax" EXTRA=()
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  common_option "$@"
  if ((SHIFT_N)); then
    shift "$SHIFT_N"
    continue
  fi
  case $1 in
    --config) CONFIG=$(need_value "$@"); shift 2 ;;
    --topology) TOPOLOGY=$(need_value "$@"); shift 2 ;;
    --on-worker) ON_WORKER=1; shift ;;
    --dir) DIR=$(need_value "$@"); shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require "$CONFIG" "--config CONFIG"
require "$TOPOLOGY" "--topology TYPE"
aot=(msjax-aot --config "$CONFIG" --topology "$TOPOLOGY" "${EXTRA[@]}")

if ((ON_WORKER)); then
  require_tpu
  tpu_ssh 0 "cd $(shell_quote "$DIR") && .venv/bin/$(join_quoted "${aot[@]}")"
else
  if ((!DRY_RUN)) && ! command -v msjax-aot >/dev/null 2>&1; then
    die "msjax-aot not found: activate the msjax venv (pip install -c constraints.txt -e '.[tpu]')"
  fi
  run "${aot[@]}"
fi
