#!/usr/bin/env bash
# Delete a queued resource and its TPU VM / pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE [--project PROJECT] [--dry-run]

Delete the queued resource NAME and its TPU (all workers; local disks are lost,
the workdir bucket is kept).

  --name NAME          queued resource and TPU name        (or env MSJAX_TPU_NAME)
  --zone ZONE          its zone                            (or env MSJAX_TPU_ZONE)
  --project PROJECT    GCP project (default: gcloud's)     (or env MSJAX_GCP_PROJECT)
  --dry-run            print the command instead of running it
  -h, --help           this help
USAGE
}

split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  common_option "$@"
  if ((SHIFT_N == 0)); then
    die "unknown option '$1' (see --help)"
  fi
  shift "$SHIFT_N"
done

require_tpu
run gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --force --quiet
