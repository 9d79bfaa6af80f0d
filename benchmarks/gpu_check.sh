#!/usr/bin/env bash
# Everything palgan checks on a CUDA machine, in one call of at most 9 minutes:
#   1. the oracle tests on the GPU (nn.LSTM/nn.RNN parity, gradcheck, the equations, fp16/bf16, autocast);
#   2. benchmarks/lstm_speed.py: script, compile and nn.LSTM (cuDNN) in fp32, script and nn.LSTM in bf16;
#   3. benchmarks/gan_speed.py: the trainer against a plain loop on the same GPU, at width 128 and 64;
#   4. a short paper-preset GAN run with its defaults (stage metrics, the final evaluation, the walks);
#   5. the LSTM trainer at T=20 on the GPU;
#   6. where the machine has 2 GPUs or more, the GAN on 2 processes (DDP over NCCL).
#
#   bash benchmarks/gpu_check.sh          # writes benchmarks/results/gpu/<card>/
#
# It needs no wandb and no ray (the trainers run with the null tracker). Missing packages, or no
# GPU, stop it at once with one line and exit code 2. Each step has its own time limit, so one slow
# step cannot eat the others' budget; a step that fails or times out is recorded, the rest still
# run, and the exit code is 1 if any step failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

missing=$("$PY" - <<'PY' 2>/dev/null
import importlib.util
need = ["torch", "torchvision", "accelerate", "matplotlib", "tqdm", "torchmetrics", "scipy", "numpy",
        "tyro", "yaml", "filelock", "pytest", "xdist"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
) || missing="python3 (or torch)"
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing; install them (pip install -e '.[dev]' or wheels) and rerun" >&2
    exit 2
fi
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-') if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$card" ]; then
    echo "gpu_check: no CUDA GPU is visible to torch; run it on a GPU machine" >&2
    exit 2
fi
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")

RES=benchmarks/results/gpu/$card
RUNS=${TMPDIR:-/tmp}/palgan-gpu-check-runs
rm -rf "$RUNS"
mkdir -p "$RES" "$RUNS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PALGAN_CACHE=${PALGAN_CACHE:-$RUNS/cache}
exec > >(tee "$RES/gpu_check.txt") 2>&1

failed=""
step() {   # step <seconds> <name> <command...>
    local limit=$1 name=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
    [ $rc -eq 0 ] || failed="$failed $name"
}

echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $gpus GPU(s)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'accelerate', accelerate.__version__)"
git log -1 --format='commit %H' 2>/dev/null || true

step 60 tests env PALGAN_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -n 4 \
    tests/test_models.py tests/test_lstm_precision.py
step 60 lstm_speed_fp32 "$PY" benchmarks/lstm_speed.py --device cuda --precision fp32 --rounds 5 \
    --variants report-loop eager script nn.LSTM --json "$RES/lstm_speed_fp32.json"
step 60 lstm_speed_compile "$PY" benchmarks/lstm_speed.py --device cuda --precision fp32 --rounds 5 \
    --sizes 128,128,20 --variants compile script nn.LSTM --json "$RES/lstm_speed_fp32_compile.json"
step 50 lstm_speed_bf16 "$PY" benchmarks/lstm_speed.py --device cuda --precision bf16 --rounds 5 \
    --variants script nn.LSTM --json "$RES/lstm_speed_bf16.json"
step 60 gan_speed_b128 "$PY" benchmarks/gan_speed.py --base-channels 128 --batch-size 128 --mixed-precision bf16 \
    --steps 100 --rounds 3 --json "$RES/gan_speed_b128_bs128_bf16.json"
step 45 gan_speed_b64 "$PY" benchmarks/gan_speed.py --base-channels 64 --batch-size 64 --mixed-precision bf16 \
    --steps 100 --rounds 3 --json "$RES/gan_speed_b64_bs64_bf16.json"
step 80 gan_paper accelerate launch --config_file launch/gpu_1.yaml --mixed_precision bf16 trainers/gan.py \
    --preset paper --epochs 1 --no-wandb --no-progress --out-dir "$RUNS" --run-name gan-paper-bf16
step 60 lstm_T20 accelerate launch --config_file launch/gpu_1.yaml trainers/lstm.py --seq-length 20 --steps 1500 \
    --no-wandb --no-progress --out-dir "$RUNS" --run-name lstm-T20
if [ "$gpus" -ge 2 ]; then
    step 60 gan_2gpu accelerate launch --config_file launch/gpu_node.yaml --num_processes 2 --mixed_precision bf16 \
        trainers/gan.py --preset paper --max-steps 200 --no-wandb --no-progress --out-dir "$RUNS" --run-name gan-2gpu
else
    echo; echo "=== gan_2gpu: skipped, this machine has 1 GPU ==="
fi

# What the runs wrote that a reader wants (not their checkpoints).
for run in gan-paper-bf16 lstm-T20 gan-2gpu; do
    [ -f "$RUNS/$run/metrics.json" ] || continue
    mkdir -p "$RES/$run"
    cp "$RUNS/$run/metrics.json" "$RES/$run/"
    for f in "$RUNS/$run"/samples/final.png "$RUNS/$run"/figures/*.png; do [ -f "$f" ] && cp "$f" "$RES/$run/"; done
done
"$PY" - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
for name in ("gan-paper-bf16", "gan-2gpu"):
    f = runs / name / "metrics.json"
    if f.exists():
        m = json.loads(f.read_text())
        line = (f"{name}: {m['train_images_per_s']:.0f} images/s over {m['steps']} iterations on {m['processes']} "
                f"process(es), wall {m['wall_time_s']:.0f} s, evaluation {m.get('eval_time_s', 0):.0f} s")
        if m.get("final"):
            fin = m["final"]
            line += f"; final FID {fin['fid']:.2f} (floor {fin['fid_floor']:.2f}), classifier score {fin['classifier_score']:.2f}"
        print(line)
f = runs / "lstm-T20" / "metrics.json"
if f.exists():
    m = json.loads(f.read_text())
    print(f"lstm-T20: {m['steps'] / m['wall_time_s']:.0f} steps/s, val/acc {m.get('val/acc', float('nan')):.4f}, wall {m['wall_time_s']:.0f} s")
PY

echo
if [ -z "$failed" ]; then
    echo "gpu_check: all steps passed -> $RES"
    exit 0
fi
echo "gpu_check: FAILED:$failed -> $RES"
exit 1
