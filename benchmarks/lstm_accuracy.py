"""Part I's headline figures: validation accuracy of the LSTM and the RNN at T=5 and T=20.

    python benchmarks/lstm_accuracy.py                    # all rows, the report's settings otherwise
    python benchmarks/lstm_accuracy.py --rows lstm:5 --json out.json

Each row is one full run of trainers/lstm.py's own ``train()`` (10,000 steps, batch 128, RMSprop 1e-3,
clip 10, hidden 128), so the numbers are the trainer's. ``lstm-fb0`` is the LSTM with the report's
initialisation (forget-gate bias 0) instead of palgan's default of 1 (``-fb<b>``: bias b, e.g.
``lstm-fb5:200``); ``/scalar`` rows feed the 1-d digit of the course template instead of one-hot vectors.
Each row reports the last and the best validation accuracy (the trainer keeps both). Runs use one thread each (OMP_NUM_THREADS=1 is
recommended on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from trainers.cli import build
from trainers.lstm import LSTMConfig, train

DEFAULT_ROWS = "lstm:5,lstm:20,lstm-fb0:20,rnn:5,rnn:20,lstm/scalar:20,rnn/scalar:5,rnn/scalar:20"


def config_for(row: str, out_dir: str, steps: int) -> LSTMConfig:
    """``model[-fb<b>][/scalar]:T`` -> the trainer's config (-fb<b>: forget bias b; /scalar: 1-d input)."""
    spec, length = row.split(":")
    model, _, encoding = spec.partition("/")
    model, _, bias = model.partition("-fb")
    return build(LSTMConfig, model=model, seq_length=int(length), forget_bias=float(bias) if bias else 1.0,
                      input_encoding=encoding or "onehot", steps=steps, eval_every=100,
                      out_dir=out_dir, run_name=run_name(row), wandb=False, progress=False)


def run_name(row: str) -> str:
    return row.replace(":", "-T").replace("/", "-")


def steps_to_reach(run_dir: Path, accuracy: float):
    """The first evaluated step whose val/acc reaches ``accuracy`` (None if none did), read back
    from the curve history stored in the run's last checkpoint."""
    meta = json.loads((sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "palgan.json").read_text())
    hits = [r["step"] for r in meta["extra"]["history"] if r.get("val/acc", 0.0) >= accuracy]
    return hits[0] if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS,
                        help="comma-separated model[-fb<b>][/scalar]:T, model lstm or rnn")
    parser.add_argument("--steps", type=int, default=10_000, help="training steps per run")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows.split(","):
            m = train(config_for(row, tmp, args.steps))
            if not m["finished"]:  # SIGTERM/SIGINT: the trainer checkpointed and returned early
                sys.exit(f"stopped during {row}")
            first = steps_to_reach(Path(tmp) / run_name(row), 0.999)
            results.append({"row": row, "val_acc": m["val/acc"], "val_loss": m["val/loss"],
                            "best_val_acc": m["best_val_acc"], "best_step": m["best_step"],
                            "steps": m["steps"], "wall_s": m["wall_time_s"], "steps_to_99.9": first})
            print(f"{row:>12}  val/acc {m['val/acc']:.4f} (best {m['best_val_acc']:.4f} at step {m['best_step']})  "
                  f"val/loss {m['val/loss']:.4f}  first val/acc >= 99.9% at step {first}  "
                  f"wall {m['wall_time_s']:.0f}s", flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| run | T | val acc (last) | best val acc (step) | val loss | first step at >= 99.9% | wall (s) |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        model, length = r["row"].split(":")
        print(f"| {model} | {length} | {100 * r['val_acc']:.2f}% | {100 * r['best_val_acc']:.2f}% ({r['best_step']}) | "
              f"{r['val_loss']:.4f} | {r['steps_to_99.9'] or 'never'} | {r['wall_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
