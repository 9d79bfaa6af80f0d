"""Remake the pictures under docs/images/ from fixed seeds.

    python benchmarks/make_doc_images.py                         # GAN (~10 min on 2 CPU cores) + LSTM (~1 min)
    python benchmarks/make_doc_images.py --gan-run runs/docs/gan # reuse a finished default GAN run
    python benchmarks/make_doc_images.py --only lstm             # the LSTM pictures alone
    python benchmarks/make_doc_images.py --only lstm-T1000       # the T=1000 curriculum run (~3-8 min)
    python benchmarks/make_doc_images.py --only horizon --sweep runs/sweeps/lstm-sweep   # a finished sweep's figure

Each picture comes from one of these commands (seed 0, the trainers' defaults otherwise):

    accelerate launch trainers/gan.py --out-dir runs/docs --run-name gan
        -> gan_final.png (samples/final.png), gan_losses.png (figures/losses.png),
           gan_stages.png (figures/three_panel.png)
    python trainers/gan.py interpolate --checkpoint runs/docs/gan --pairs 1-7 --mode both --out runs/docs/walk
        -> gan_walk.png (interp_linear_vs_slerp.png)
    python trainers/lstm.py --seq-length 20 --steps 1000 --eval-every 100 --num-threads 1 --out-dir runs/docs --run-name lstm-T20
        -> lstm_gates.png (figures/gates.png), lstm_curves.png (figures/curves.png)
    python trainers/lstm.py --seq-length 1000 --hidden-dim 64 --lr 1.5e-3 --forget-bias 5 --curriculum --steps 8000
        --eval-every 250 --solved-acc 0.99 --stop-when-solved 1 --num-threads 1 --out-dir runs/docs --run-name lstm-T1000
        -> lstm_memory_T1000.png (figures/memory.png), lstm_curves_T1000.png (figures/curves.png)
    python tune/lstm_sweep.py  ->  horizon.png (<sweep>/figures/horizon.png)

The copies are shrunk to at most ``--width`` pixels and a 128-colour palette so the repository
stays small; the runs themselves keep the full-size figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from trainers.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"

GAN_COPIES = {"samples/final.png": "gan_final.png", "figures/losses.png": "gan_losses.png",
              "figures/three_panel.png": "gan_stages.png"}
LSTM_COPIES = {"figures/gates.png": "lstm_gates.png", "figures/curves.png": "lstm_curves.png"}
LSTM_ARGS = ["--seq-length", "20", "--steps", "1000", "--eval-every", "100", "--num-threads", "1"]
T1000_COPIES = {"figures/memory.png": "lstm_memory_T1000.png", "figures/curves.png": "lstm_curves_T1000.png"}
T1000_ARGS = ["--seq-length", "1000", "--hidden-dim", "64", "--lr", "1.5e-3", "--forget-bias", "5", "--curriculum",
              "--steps", "8000", "--eval-every", "250", "--solved-acc", "0.99", "--stop-when-solved", "1",
              "--num-threads", "1"]
WALK_PAIRS = "1-7"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "WANDB_SILENT": "true"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def shrink(src: Path, dst: Path, width: int) -> None:
    """Copy ``src`` to ``dst`` at most ``width`` pixels wide, as a 128-colour PNG."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
    print(f"{dst.relative_to(ROOT)}: {img.width}x{img.height}, {dst.stat().st_size / 1024:.0f} KiB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/docs", help="where the runs are written")
    parser.add_argument("--gan-run", default="", help="a finished default GAN run to reuse instead of training")
    parser.add_argument("--only", choices=("gan", "lstm", "lstm-T1000", "horizon", "all"), default="all",
                        help="all: gan and lstm (lstm-T1000 and horizon only when asked)")
    parser.add_argument("--sweep", default="runs/sweeps/lstm-sweep", help="the finished sweep --only horizon reads")
    parser.add_argument("--width", type=int, default=900, help="largest width of a copied picture")
    args = parser.parse_args(argv)
    out = (ROOT / args.out_dir).resolve()
    py = sys.executable

    if args.only in ("gan", "all"):
        gan = Path(args.gan_run).resolve() if args.gan_run else out / "gan"
        if not args.gan_run:
            shutil.rmtree(gan, ignore_errors=True)   # this script's own earlier run
            run([py, "-m", "accelerate.commands.launch", "--num_processes", "1", "trainers/gan.py",
                 "--out-dir", str(out), "--run-name", "gan", "--no-progress"])
        run([py, "trainers/gan.py", "interpolate", "--checkpoint", str(gan), "--pairs", WALK_PAIRS,
             "--mode", "both", "--out", str(out / "walk")])
        for src, dst in GAN_COPIES.items():
            shrink(gan / src, IMAGES / dst, args.width)
        shrink(out / "walk" / "interp_linear_vs_slerp.png", IMAGES / "gan_walk.png", args.width)

    if args.only in ("lstm", "all"):
        shutil.rmtree(out / "lstm-T20", ignore_errors=True)
        run([py, "trainers/lstm.py", *LSTM_ARGS, "--out-dir", str(out), "--run-name", "lstm-T20",
             "--no-progress"])
        for src, dst in LSTM_COPIES.items():
            shrink(out / "lstm-T20" / src, IMAGES / dst, args.width)

    if args.only == "lstm-T1000":
        shutil.rmtree(out / "lstm-T1000", ignore_errors=True)
        run([py, "trainers/lstm.py", *T1000_ARGS, "--out-dir", str(out), "--run-name", "lstm-T1000", "--no-progress"])
        for src, dst in T1000_COPIES.items():
            shrink(out / "lstm-T1000" / src, IMAGES / dst, args.width)

    if args.only == "horizon":
        shrink((ROOT / args.sweep).resolve() / "figures" / "horizon.png", IMAGES / "horizon.png", args.width)


if __name__ == "__main__":
    main()
