#!/usr/bin/env bash
# Launch msjax-train on every worker of a TPU VM / pod slice with one command.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT --name NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/RUN [options] [-- ARGS]

Run the same msjax-train command on all workers (JAX finds the other workers by itself on TPU).
Worker 0's output streams to the console and to LOG_DIR/NAME.log; each worker also appends its
output to ~/DIR/logs/train-worker<N>.log, and a failing worker prints its last lines.
Resuming needs no flag: msjax-train restarts from the latest checkpoint in the workdir, so after
a preemption or a crash the same command continues the run (watch.sh automates this).

  --name NAME          TPU name                            (or env MSJAX_TPU_NAME)
  --zone ZONE          its zone                            (or env MSJAX_TPU_ZONE)
  --project PROJECT    GCP project (default: gcloud's)     (or env MSJAX_GCP_PROJECT)
  --config CONFIG      config file, relative to the install directory on the workers
  --workdir URL        run directory for checkpoints and metrics; a gs:// bucket path so that
                       every worker shares it and it outlives the TPU
  --env KEY=VALUE      environment variable for msjax-train (repeatable), e.g.
                       --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
  --dir DIR            msjax install directory on the workers (default: msjax)
  --log-dir DIR        local directory for the console log (default: logs)
  -- ARGS              more msjax-train flags (config overrides: -- --config.FIELD=VALUE)
  --dry-run            print the commands instead of running them
  -h, --help           this help
USAGE
}

CONFIG="" WORKDIR="" DIR="msjax" LOG_DIR="logs" ENVS=() EXTRA=()
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
    --workdir) WORKDIR=$(need_value "$@"); shift 2 ;;
    --env)
      ENVS+=("$(need_value "$@")"); shift 2
      if [[ ! ${ENVS[-1]} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
        die "--env ${ENVS[-1]}: expected KEY=VALUE"
      fi
      ;;
    --dir) DIR=$(need_value "$@"); shift 2 ;;
    --log-dir) LOG_DIR=$(need_value "$@"); shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require_tpu
require "$CONFIG" "--config CONFIG"
require "$WORKDIR" "--workdir gs://BUCKET/RUN"
if [[ $WORKDIR != gs://* ]]; then
  note "warning: --workdir $WORKDIR is not a gs:// path: on a pod each worker sees its own disk," \
    "and the checkpoints die with the TPU, so resuming after preemption will not work"
fi

train=(.venv/bin/msjax-train --config "$CONFIG" --config.workdir="$WORKDIR" "${EXTRA[@]}")
if ((${#ENVS[@]})); then
  train=(env "${ENVS[@]}" "${train[@]}")
fi
train_cmd=$(join_quoted "${train[@]}")
worker_id="curl -sf -m 10 -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
# On worker 0 stream and log; elsewhere log only, and print the tail if msjax-train fails.
remote="set -uo pipefail; cd $(shell_quote "$DIR") || exit 1; mkdir -p logs; \
W=\$($worker_id || echo 0); LOG=logs/train-worker\$W.log; \
echo \"=== launch \$(date -u +%FT%TZ) on worker \$W\" >> \$LOG; \
if [ \"\$W\" = 0 ]; then $train_cmd 2>&1 | tee -a \$LOG; exit \$?; fi; \
$train_cmd >> \$LOG 2>&1; rc=\$?; \
if [ \$rc -ne 0 ]; then echo \"[worker \$W] msjax-train failed (exit \$rc), end of \$LOG:\"; \
tail -n 40 \$LOG; fi; exit \$rc"

note "launching on all workers of $TPU_NAME: $(join_quoted msjax-train --config "$CONFIG" \
  --config.workdir="$WORKDIR" "${EXTRA[@]}")"
run_logged "$LOG_DIR/$TPU_NAME.log" gcloud compute tpus tpu-vm ssh "$TPU_NAME" \
  "${GCLOUD_SCOPE[@]}" --worker=all --command "$remote"
