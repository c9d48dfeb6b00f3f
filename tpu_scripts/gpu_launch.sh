#!/usr/bin/env bash
# Launch msjax-train on several GPU hosts: one process per host, wired by jax.distributed.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT (--hosts H0,H1,... | --hostfile FILE) --config CONFIG --workdir DIR [options] [-- ARGS]

Start msjax-train on every host over ssh, one process per host using all its GPUs, with
MSJAX_COORDINATOR_ADDRESS (host 0), MSJAX_NUM_PROCESSES and MSJAX_PROCESS_ID set for each.
Host 0's output streams to the console; every host's output goes to LOG_DIR/host<N>.log; a failed
host is reported as soon as it exits, and the exit status is non-zero if any failed. Every host needs msjax in ~/DIR/.venv
(pip install -c constraints.txt -e '.[gpu]') and must reach host 0 on PORT.

  --hosts LIST         comma-separated ssh destinations ([user@]host), host 0 first
  --hostfile FILE      one ssh destination per line instead (# comments allowed)
  --coordinator ADDR   address the others use to reach host 0 (default: host 0's name)
  --port PORT          coordinator port on host 0 (default: 8476)
  --config CONFIG      config file, relative to DIR on the hosts
  --workdir DIR        run directory (checkpoints, metrics) visible to every host: a shared
                       file system path or a gs:// bucket
  --env KEY=VALUE      environment variable for msjax-train (repeatable)
  --dir DIR            msjax checkout on the hosts, relative to home (default: msjax)
  --log-dir DIR        local directory for the per-host logs (default: logs)
  --ssh-option OPT     extra ssh option (repeatable), e.g. --ssh-option=-i --ssh-option=KEY
  --print-commands     print the command to run on each host (to start them yourself)
  -- ARGS              more msjax-train flags
  --dry-run            print the ssh commands instead of running them
  -h, --help           this help
USAGE
}

HOSTS=() COORDINATOR="" PORT=8476 CONFIG="" WORKDIR="" DIR="msjax" LOG_DIR="logs"
ENVS=() SSH_OPTS=() EXTRA=() PRINT_ONLY=0
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --hosts)
      IFS=, read -r -a HOSTS <<<"$(need_value "$@")"
      shift 2
      ;;
    --hostfile)
      file=$(need_value "$@")
      [[ -r $file ]] || die "--hostfile $file: cannot read it"
      mapfile -t HOSTS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$file")
      shift 2
      ;;
    --coordinator) COORDINATOR=$(need_value "$@"); shift 2 ;;
    --port) PORT=$(need_value "$@"); shift 2 ;;
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
    --ssh-option)
      (($# >= 2)) || die "option --ssh-option needs a value"
      SSH_OPTS+=("$2"); shift 2
      ;;
    --print-commands) PRINT_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage && exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

((${#HOSTS[@]})) || die "missing --hosts H0,H1,... or --hostfile FILE (see --help)"
require "$CONFIG" "--config CONFIG"
require "$WORKDIR" "--workdir DIR"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port $PORT is not a port number"
for host in "${HOSTS[@]}"; do
  [[ -n $host ]] || die "--hosts has an empty entry"
done
host0=${HOSTS[0]#*@}
COORDINATOR=${COORDINATOR:-$host0}
if [[ $COORDINATOR != *:* ]]; then
  COORDINATOR=$COORDINATOR:$PORT
fi
NUM=${#HOSTS[@]}

# The shell command for host $1.
host_command() {
  local cmd=(env MSJAX_COORDINATOR_ADDRESS="$COORDINATOR" MSJAX_NUM_PROCESSES="$NUM"
    MSJAX_PROCESS_ID="$1" "${ENVS[@]}" .venv/bin/msjax-train --config "$CONFIG"
    --config.workdir="$WORKDIR" "${EXTRA[@]}")
  echo "cd $(shell_quote "$DIR") && $(join_quoted "${cmd[@]}")"
}

if ((PRINT_ONLY)); then
  for i in "${!HOSTS[@]}"; do
    echo "# host $i: ${HOSTS[i]}"
    host_command "$i"
  done
  exit 0
fi
if ((!DRY_RUN)); then
  command -v ssh >/dev/null 2>&1 || die "ssh not found"
  mkdir -p "$LOG_DIR"
fi

note "starting $NUM processes, coordinator $COORDINATOR"
pids=()
for i in "${!HOSTS[@]}"; do
  ssh_cmd=(ssh -o BatchMode=yes "${SSH_OPTS[@]}" "${HOSTS[i]}" "$(host_command "$i")")
  log=$LOG_DIR/host$i.log
  if ((DRY_RUN)); then
    if ((i == 0)); then
      echo "$(join_quoted "${ssh_cmd[@]}") 2>&1 | tee $(shell_quote "$log") &"
    else
      echo "$(join_quoted "${ssh_cmd[@]}") > $(shell_quote "$log") 2>&1 &"
    fi
  elif ((i == 0)); then
    "${ssh_cmd[@]}" > >(tee "$log") 2>&1 &
    pids+=($!)
  else
    "${ssh_cmd[@]}" >"$log" 2>&1 &
    pids+=($!)
  fi
done
((DRY_RUN)) && exit 0

# Wait for all, reporting each failure as it happens (JAX then stops the other processes: they
# lose the failed peer and exit with an error after its heartbeat timeout).
status=0
remaining=${#pids[@]}
while ((remaining)); do
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    remaining=$((remaining - 1))
    if ((rc)); then
      note "host $i (${HOSTS[i]}) exited with status $rc: see $LOG_DIR/host$i.log"
      status=1
    fi
  done
  if ((remaining)); then
    wait -n || true
  fi
done
exit "$status"
