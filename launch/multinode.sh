#!/usr/bin/env bash
# One node's share of a multi-node run: `accelerate launch --config_file launch/multinode.yaml` with
# this node's machine rank and the main node's address, every wait bounded by DIST_TIMEOUT.
# Run it on every node (launch/slurm_multinode.sbatch does, through srun):
#
#   launch/multinode.sh <machine-rank> <main-node-address> trainers/gan.py [trainer flags]
#
# Environment (defaults in brackets):
#   NUM_MACHINES [2]  PROCS_PER_MACHINE [this node's GPU count, else 1]  MAIN_PORT [29500]
#   DIST_TIMEOUT [300]  seconds a node waits for the main node (rendezvous) and each collective waits
#                       for the other processes (the trainers' --dist-timeout)
#   CONFIG [launch/multinode.yaml]   DRY_RUN=1 prints the accelerate command instead of running it
#
# A node other than rank 0 first waits up to DIST_TIMEOUT for the main node's port, and ends with
# one line and exit code 2 when it never answers (accelerate's own rendezvous would wait 900 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PROG=launch/multinode.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }

[ $# -ge 3 ] || die "usage: $PROG <machine-rank> <main-node-address> <trainer script> [trainer flags]"
RANK=$1 MAIN_ADDR=$2 SCRIPT=$3
shift 3
NUM_MACHINES=${NUM_MACHINES:-2}
MAIN_PORT=${MAIN_PORT:-29500}
DIST_TIMEOUT=${DIST_TIMEOUT:-300}
CONFIG=${CONFIG:-launch/multinode.yaml}
if [ -z "${PROCS_PER_MACHINE:-}" ]; then
  PROCS_PER_MACHINE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$PROCS_PER_MACHINE" -gt 0 ] || PROCS_PER_MACHINE=1
fi

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
is_int "$NUM_MACHINES" && [ "$NUM_MACHINES" -ge 1 ] || die "NUM_MACHINES must be an integer >= 1, got '$NUM_MACHINES'"
is_int "$RANK" && [ "$RANK" -lt "$NUM_MACHINES" ] \
  || die "machine rank must be an integer in 0..$((NUM_MACHINES - 1)), got '$RANK'"
is_int "$PROCS_PER_MACHINE" && [ "$PROCS_PER_MACHINE" -ge 1 ] \
  || die "PROCS_PER_MACHINE must be an integer >= 1, got '$PROCS_PER_MACHINE'"
is_int "$MAIN_PORT" && [ "$MAIN_PORT" -ge 1 ] && [ "$MAIN_PORT" -le 65535 ] \
  || die "MAIN_PORT must be a port number, got '$MAIN_PORT'"
is_int "$DIST_TIMEOUT" && [ "$DIST_TIMEOUT" -ge 1 ] || die "DIST_TIMEOUT must be whole seconds >= 1, got '$DIST_TIMEOUT'"
[ -n "$MAIN_ADDR" ] || die "the main node's address is empty; give node 0's hostname or IP"
[ -f "$CONFIG" ] || die "CONFIG $CONFIG is not a file; leave CONFIG unset for launch/multinode.yaml"
[ -f "$SCRIPT" ] || die "trainer script $SCRIPT is not a file; give trainers/gan.py or trainers/lstm.py"

CMD=(accelerate launch --config_file "$CONFIG"
     --num_machines "$NUM_MACHINES" --num_processes $((NUM_MACHINES * PROCS_PER_MACHINE))
     --machine_rank "$RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
     --rdzv_conf "timeout=$DIST_TIMEOUT"
     "$SCRIPT" --dist-timeout "$DIST_TIMEOUT" "$@")

if [ -n "${DRY_RUN:-}" ]; then
  printf -v line '%q ' "${CMD[@]}"
  echo "machine rank $RANK: ${line% }"
  exit 0
fi

if [ "$RANK" -gt 0 ]; then
  python - "$MAIN_ADDR" "$MAIN_PORT" "$DIST_TIMEOUT" <<'PY' \
    || die "the main node $MAIN_ADDR:$MAIN_PORT did not answer within DIST_TIMEOUT=${DIST_TIMEOUT}s; start machine rank 0 there with the same MAIN_PORT, or check the address and the firewall"
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.5)
PY
fi
exec "${CMD[@]}"
