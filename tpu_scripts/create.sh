#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource (the TPU node gets the same name).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --accelerator TYPE [options]

Create a TPU VM or pod slice as a queued resource; the TPU node is named NAME too.

  --name NAME          queued resource and TPU name        (or env MSJAX_TPU_NAME)
  --zone ZONE          e.g. us-east5-a                     (or env MSJAX_TPU_ZONE)
  --project PROJECT    GCP project (default: gcloud's)     (or env MSJAX_GCP_PROJECT)
  --accelerator TYPE   v4-32, v5e-8 (= v5litepod-8), v5p-64, v6e-8, ...
  --runtime VERSION    TPU software version (default: the one for the TPU generation,
                       e.g. v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
  --spot               spot capacity: cheaper, may be preempted at any time
  --on-demand          on-demand capacity (default)
  --reserved           use your reserved capacity
  --wait               return only once the TPU is ACTIVE (polls every \$MSJAX_POLL_S=${POLL_S}s)
  --dry-run            print the commands instead of running them
  -h, --help           this help
USAGE
}

ACCELERATOR="" RUNTIME="" CAPACITY="on-demand" WAIT=0
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  common_option "$@"
  if ((SHIFT_N)); then
    shift "$SHIFT_N"
    continue
  fi
  case $1 in
    --accelerator) ACCELERATOR=$(need_value "$@"); shift 2 ;;
    --runtime) RUNTIME=$(need_value "$@"); shift 2 ;;
    --spot | --on-demand | --reserved) CAPACITY=${1#--}; shift ;;
    --wait) WAIT=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require_tpu
require "$ACCELERATOR" "--accelerator TYPE"
ACCELERATOR=$(accelerator_type "$ACCELERATOR")
RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}

cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME"
  "${GCLOUD_SCOPE[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
if [[ $CAPACITY != on-demand ]]; then
  cmd+=("--$CAPACITY")
fi
note "requesting $ACCELERATOR ($CAPACITY, runtime $RUNTIME) as $TPU_NAME in $ZONE"
run "${cmd[@]}"
if ((WAIT)); then
  wait_active
fi
