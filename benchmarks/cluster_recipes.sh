#!/usr/bin/env bash
# The scale-out recipes of docs/scaling.md run on one machine, with their wall times:
#   1. a Ray head started by hand (token auth on), the quick sweep joining it through --address;
#   2. launch/multinode.yaml as two accelerate "nodes" (machine ranks 0 and 1 on 127.0.0.1, one
#      process each): the LSTM, and the GAN's cpu-demo defaults with evaluation (sizes shrunk);
#   3. the SLURM script's dry run for 2 nodes x 4 GPUs.
#
#   bash benchmarks/cluster_recipes.sh                 # everything; OUT=folder (default: a temp folder)
#   PARTS="slurm nodes" bash benchmarks/cluster_recipes.sh
#
# Ports are picked free at the moment of use. Writes $OUT/results.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/cluster-recipes-XXXX)}
PARTS=${PARTS:-"slurm nodes ray"}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/results.txt") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
export TORCH_DISTRIBUTED_DEBUG=DETAIL
free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
now() { date +%s.%N; }
secs() { python -c "print(f'{$2 - $1:.1f}')"; }
echo "== $(nproc --all) cores, $(python -c 'import torch, ray, accelerate; print("torch", torch.__version__, "| ray", ray.__version__, "| accelerate", accelerate.__version__)')"

if [[ " $PARTS " == *" slurm "* ]]; then
  echo "== SLURM dry run: 2 nodes x 4 GPUs"
  DRY_RUN=1 SLURM_JOB_NODELIST=gpu-a,gpu-b SLURM_NNODES=2 SLURM_GPUS_ON_NODE=4 SLURM_JOB_ID=42 \
    SLURM_JOB_NAME=palgan bash launch/slurm_multinode.sbatch trainers/gan.py
fi

two_nodes() {   # <name> <trainer args...>: both machine ranks at once; wall time of the slower
  local name=$1 port t0 t1 pids=()
  shift
  port=$(free_port)
  t0=$(now)
  for rank in 0 1; do
    accelerate launch --config_file launch/multinode.yaml --mixed_precision bf16 --num_machines 2 --num_processes 2 \
      --machine_rank $rank --main_process_ip 127.0.0.1 --main_process_port "$port" --rdzv_conf timeout=300 \
      "$@" --no-progress --out-dir "$OUT/runs" --run-name "$name" > "$OUT/$name-node$rank.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"   # (a bare wait would also wait for the tee above)
  t1=$(now)
  tail -n 1 "$OUT/$name-node0.log"
  echo "$name: two nodes x 1 process, wall $(secs "$t0" "$t1") s (both launchers, start-up included)"
}

if [[ " $PARTS " == *" nodes "* ]]; then
  echo "== two accelerate nodes on 127.0.0.1 (launch/multinode.yaml, bf16)"
  two_nodes lstm trainers/lstm.py --seq-length 20 --steps 1000 --val-size 2000
  two_nodes gan trainers/gan.py --preset cpu-demo --base-channels 8 --batch-size 32 --train-subset 640 --epochs 2 \
    --stage-samples 200 --eval-samples 400
fi

if [[ " $PARTS " == *" ray "* ]]; then
  echo "== Ray head by hand, the quick sweep through --address"
  [ -s ~/.ray/auth_token ] || ray get-auth-token --generate > /dev/null
  port=$(free_port)
  setsid ray start --head --port "$port" --num-cpus 2 --include-dashboard false --disable-usage-stats --block \
    > "$OUT/ray-head.log" 2>&1 &
  head_pid=$!
  until grep -qs "Ray runtime started" "$OUT/ray-head.log"; do
    kill -0 $head_pid 2> /dev/null || { cat "$OUT/ray-head.log"; exit 1; }
    sleep 0.5
  done
  grep -o "Token authentication is enabled.*" "$OUT/ray-head.log" | cut -c1-60
  t0=$(now)
  python tune/lstm_sweep.py --quick --address "127.0.0.1:$port" --out-dir "$OUT/runs" > "$OUT/sweep.log" 2>&1
  rc=$?
  t1=$(now)
  grep "joined the Ray cluster\|trials (" "$OUT/sweep.log"
  echo "quick sweep through --address 127.0.0.1:$port: exit $rc, wall $(secs "$t0" "$t1") s"
  kill -TERM -- -$head_pid 2> /dev/null
  sleep 5
  kill -KILL -- -$head_pid 2> /dev/null
fi
echo "results in $OUT/results.txt"
