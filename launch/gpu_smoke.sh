#!/usr/bin/env bash
# GPU smoke test, at most 10 minutes on one GPU: the GAN's paper preset for 1 epoch in bf16 with its
# defaults (stage metrics, the final 10,000-sample evaluation and the walks), then the LSTM at T=20,
# printing images/s, the evaluation's time and numbers, and steps/s. Writes everything to ${OUT:-gpu_smoke}/results.txt.
#
#   bash launch/gpu_smoke.sh
#
# The GPU image may lack wandb, ray and matplotlib: the trainers run without wandb and ray (a null
# tracker, --no-wandb); matplotlib, tqdm, torchmetrics and scipy must be importable. Put their wheels in ./wheels to install
# them offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_smoke}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
exec > >(tee -a "$RESULTS") 2>&1

if ! python -c "import matplotlib, tqdm, safetensors, torchmetrics, scipy" 2>/dev/null; then
  [ -d wheels ] && pip install --no-index --find-links wheels matplotlib tqdm safetensors torchmetrics scipy
fi
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== GAN, paper preset (b=128, batch 128), 1 epoch, bf16 =="
timeout 420 accelerate launch --config_file launch/gpu_1.yaml --mixed_precision bf16 trainers/gan.py --preset paper --epochs 1 \
  --stages 0,1 --no-wandb --no-progress --out-dir "$OUT" --run-name gan-paper-bf16
python - "$OUT/gan-paper-bf16/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"GAN paper bf16: {m['train_images_per_s']:.0f} images/s over {m['steps']} iterations, wall {m['wall_time_s']:.0f} s, "
      f"evaluation {m.get('eval_time_s', 0):.0f} s")
f = m.get("final", {})
if f:
    print(f"  final ({f['n']:.0f} samples): FID {f['fid']:.2f} (floor {f['fid_floor']:.2f}), "
          f"classifier score {f['classifier_score']:.2f}, classes {f['min_class_frac']:.3f}-{f['max_class_frac']:.3f}")
PY

echo "== LSTM, T=20, 10,000 steps (script backend), fp32 =="
timeout 150 accelerate launch --config_file launch/gpu_1.yaml trainers/lstm.py --seq-length 20 \
  --no-wandb --no-progress --out-dir "$OUT" --run-name lstm-T20
python - "$OUT/lstm-T20/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"LSTM T=20: {m['steps'] / m['wall_time_s']:.0f} steps/s, val/acc {m['val/acc']:.4f}, wall {m['wall_time_s']:.0f} s")
PY
echo "results in $RESULTS"
