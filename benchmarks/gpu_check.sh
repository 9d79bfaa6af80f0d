#!/usr/bin/env bash
# The LSTM checks for a CUDA machine, in at most 10 minutes, into one results file:
#   1. the oracle tests (nn.LSTM/nn.RNN parity, gradcheck, equations 1-6, fp16/bf16) on the GPU;
#   2. benchmarks/lstm_speed.py --device cuda against cuDNN in fp32 (with torch.compile), bf16, fp16.
#
#   bash benchmarks/gpu_check.sh                       # writes runs/bench/gpu_check-<host>-<time>.txt
#   bash benchmarks/gpu_check.sh results.txt
#
# Each step has its own time limit, so one slow step cannot eat the others' budget; a step that
# fails or times out is recorded and the script goes on. Exit code: 0 if every step passed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench/gpu_check-$(hostname)-$(date +%Y%m%d-%H%M%S).txt}
mkdir -p "$(dirname "$OUT")"
PY=${PYTHON:-python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch; run it on a GPU machine" >&2
    exit 2
fi

exec > >(tee "$OUT") 2>&1
failed=0
step() {   # step <seconds> <title> <command...>
    local limit=$1 title=$2
    shift 2
    echo
    echo "=== $title (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    echo "=== $title: exit $rc after $((SECONDS - t0))s ==="
    [ $rc -eq 0 ] || failed=1
}

echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name(0))"
git log -1 --format='commit %H' 2>/dev/null || true

step 150 "oracle tests on CUDA" env PALGAN_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_models.py tests/test_lstm_precision.py
step 200 "lstm_speed fp32 (TF32 off) incl. torch.compile" "$PY" benchmarks/lstm_speed.py --device cuda \
    --precision fp32 --rounds 10 --json "${OUT%.txt}-fp32.json"
step 100 "lstm_speed bf16 autocast" "$PY" benchmarks/lstm_speed.py --device cuda --precision bf16 --rounds 10 \
    --variants report-loop eager script nn.LSTM --json "${OUT%.txt}-bf16.json"
step 100 "lstm_speed fp16 autocast" "$PY" benchmarks/lstm_speed.py --device cuda --precision fp16 --rounds 10 \
    --variants report-loop eager script nn.LSTM --json "${OUT%.txt}-fp16.json"

echo
echo "=== machine-readable rows ==="
for f in "${OUT%.txt}"-fp32.json "${OUT%.txt}"-bf16.json "${OUT%.txt}"-fp16.json; do
    [ -f "$f" ] && { echo "--- $f"; cat "$f"; echo; }
done
echo "gpu_check: $([ $failed -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED) -> $OUT"
exit $failed
