"""Throughput of the trainers with their defaults on 1 and on 2 CPU processes (one thread each).

    python benchmarks/scaling.py                       # both trainers, 3 interleaved rounds
    python benchmarks/scaling.py --trainers gan --rounds 2 --json scaling.json
    python benchmarks/scaling.py --trainers gan,gan-local        # --batchnorm global (default) and local
    python benchmarks/scaling.py --paper               # the on-paper numbers for GPUs and nodes

Each measurement is a real `accelerate launch --config_file launch/cpu_{1,2}proc.yaml trainers/<x>.py`
run with OMP_NUM_THREADS=1 and the trainer's defaults: evaluation on (for the GAN a stage at epoch 0
and the final 10,000-sample evaluation with the latent walks), wandb offline, checkpoints. The
per-process batch is fixed (weak scaling, as DDP does: the global batch doubles with 2 processes).
Reported per run: training samples/s (the trainer's own timing of its loop, stages and checkpoints
left out), the seconds of evaluation (GAN: stages and final evaluation, shared out across the ranks),
the wall time of the whole command (start-up and evaluation included), and the share of the GAN's
training loop spent in GlobalBatchNorm2d's all-reduces (rank 0's, waiting for the other rank
included). 1- and 2-process runs alternate, and medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# trainer -> (script, args, samples per step per process; the GAN reports its own images/s)
TRAINERS = {
    "lstm": ("trainers/lstm.py", ["--seq-length", "20", "--steps", "600", "--eval-every", "600",
                                  "--checkpoint-every", "600", "--val-size", "1000"], 128),
    "gan": ("trainers/gan.py", ["--preset", "cpu-demo", "--batch-size", "32", "--max-steps", "80", "--stages", "0"],
            None),
    "gan-local": ("trainers/gan.py", ["--preset", "cpu-demo", "--batch-size", "32", "--max-steps", "80", "--stages",
                                      "0", "--batchnorm", "local"], None),
}


def free_port() -> int:
    """A TCP port free now, taken right before each launch (a fixed one may be in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_steps(trainer: str, args: list[str], steps: int) -> list[str]:
    """The trainer's arguments with its step count set to ``steps`` (0: as above)."""
    if not steps:
        return args
    flags = ("--steps", "--eval-every", "--checkpoint-every") if trainer == "lstm" else ("--max-steps",)
    out = list(args)
    for flag in flags:
        out[out.index(flag) + 1] = str(steps)
    return out


def run_once(trainer: str, procs: int, out: Path, tag: str, steps: int = 0, extra: list[str] = ()) -> dict:
    """One launch; its figures: samples/s, evaluation seconds, whole wall seconds, BN all-reduce share."""
    script, args, per_step = TRAINERS[trainer]
    config = ROOT / "launch" / ("cpu_1proc.yaml" if procs == 1 else "cpu_2proc.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PALGAN_DEBUG": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), script, *with_steps(trainer, args, steps), *extra,
           "--no-progress", "--out-dir", str(out), "--run-name", tag]
    tick = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if proc.returncode != 0:
        sys.exit(f"{trainer} on {procs} process(es) failed:\n{proc.stderr[-3000:]}")
    m = json.loads((out / tag / "metrics.json").read_text())
    ranks = json.loads((out / tag / "debug.json").read_text())   # per-rank facts (PALGAN_DEBUG=1)
    if "train_images_per_s" in m:   # the GAN times its loop without stages and checkpoints
        rate = m["train_images_per_s"]
    else:
        rate = m["steps"] * per_step * m["processes"] / m["wall_time_s"]
    return {"samples_per_s": rate, "eval_s": m.get("eval_time_s", 0.0), "wall_s": wall,
            "bn_allreduce_share": ranks["bn_allreduce_ms"][0] / max(ranks["train_ms"][0], 1) if "train_ms" in ranks else 0.0,
            "eval_images_per_rank": ranks.get("images_scored")}


def paper_numbers(base_channels: int = 128, batch: int = 128, latent: int = 100) -> dict:
    """Parameters to all-reduce and FLOPs of one GAN iteration (paper preset), counted on the meta device."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from models.dcgan import Discriminator, Generator

    with torch.device("meta"):
        G, D = Generator(latent, base_channels), Discriminator(base_channels)
        z, real = torch.randn(batch, latent), torch.randn(batch, 1, 28, 28)
    counter = FlopCounterMode(display=False)
    with counter:
        fake = G(z)
        d_real, d_fake = D(real), D(fake.detach())
        (F.softplus(-d_real).mean() + F.softplus(d_fake).mean()).backward()   # D step
        D.requires_grad_(False)                                               # G step, D frozen
        F.softplus(-D(fake)).mean().backward()
    g_params = sum(p.numel() for p in G.parameters())
    d_params = sum(p.numel() for p in D.parameters())
    return {"g_params": g_params, "d_params": d_params, "flops_per_iter": counter.get_total_flops(),
            "grad_bytes_fp32": 4 * (g_params + d_params)}


def print_paper_numbers() -> None:
    n = paper_numbers()
    gflop = n["flops_per_iter"] / 1e9
    mb = n["grad_bytes_fp32"] / 1e6
    print(f"paper preset (b=128, batch 128 per GPU): G {n['g_params'] / 1e6:.2f} M params, "
          f"D {n['d_params'] / 1e6:.2f} M params")
    print(f"  gradients all-reduced per iteration: {mb:.1f} MB in fp32 (DDP reduces in fp32 under autocast)")
    print(f"  compute per iteration per GPU: {gflop:.0f} GFLOP (D step on real+fake, G step through D)")
    for name, tflops, busbw in (("8 GPUs, NVLink (~150 GB/s bus bandwidth)", 150, 150e9),
                                ("2 nodes x 8 GPUs, 200 Gb/s InfiniBand (~20 GB/s)", 150, 20e9)):
        compute_ms = gflop / tflops   # GFLOP / (TFLOP/s) = ms, at a sustained rate of `tflops`
        world = 8 if name.startswith("8") else 16
        comm_ms = 2 * (world - 1) / world * n["grad_bytes_fp32"] / busbw * 1e3
        print(f"  {name}: compute ~{compute_ms:.1f} ms/iter at {tflops} TFLOP/s bf16 sustained, "
              f"ring all-reduce ~{comm_ms:.1f} ms/iter -> efficiency ~{min(1, compute_ms / max(compute_ms, comm_ms)):.0%} "
              f"if overlapped, {compute_ms / (compute_ms + comm_ms):.0%} if not")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default="lstm,gan")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--steps", type=int, default=0,
                        help="training steps of each run (0: 600 for the LSTM, 80 for the GAN)")
    parser.add_argument("--gan-args", default="", help="extra GAN flags, e.g. '--eval-samples 1000' for a quick look")
    parser.add_argument("--paper", action="store_true", help="print the on-paper GPU/node numbers and exit")
    args = parser.parse_args()
    if args.paper:
        print_paper_numbers()
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for trainer in args.trainers.split(","):
            runs = {1: [], 2: []}
            extra = args.gan_args.split() if trainer == "gan" else []
            for r in range(args.rounds):
                for procs in (1, 2):
                    got = run_once(trainer, procs, Path(tmp), f"{trainer}-{procs}-{r}", args.steps, extra)
                    runs[procs].append(got)
                    print(f"{trainer} round {r} procs {procs}: {got['samples_per_s']:.1f} samples/s, "
                          f"evaluation {got['eval_s']:.1f} s, wall {got['wall_s']:.1f} s, "
                          f"BN all-reduce {got['bn_allreduce_share']:.1%} of training", flush=True)
            med = {procs: {k: statistics.median(r[k] for r in runs[procs])
                           for k in ("samples_per_s", "eval_s", "wall_s", "bn_allreduce_share")} for procs in runs}
            results[trainer] = {"1proc": med[1], "2proc": med[2], "rounds": args.rounds,
                                "ratio": med[2]["samples_per_s"] / med[1]["samples_per_s"],
                                "eval_images_per_rank": {p: runs[p][-1]["eval_images_per_rank"] for p in runs},
                                # kept for older readers of the JSON
                                "1proc_samples_per_s": med[1]["samples_per_s"],
                                "2proc_samples_per_s": med[2]["samples_per_s"]}
    print("\n| trainer | processes | training samples/s | evaluation s | wall s (whole command) "
          "| BN all-reduce share of training |\n|---|---|---|---|---|---|")
    for trainer, r in results.items():
        for procs in ("1proc", "2proc"):
            x = r[procs]
            print(f"| {trainer} | {procs[0]} | {x['samples_per_s']:.0f} | {x['eval_s']:.1f} | {x['wall_s']:.1f} "
                  f"| {x['bn_allreduce_share']:.1%} |")
    for trainer, r in results.items():
        print(f"{trainer}: 2 processes / 1 process training throughput {r['ratio']:.2f}x, evaluation time "
              f"{r['2proc']['eval_s'] / max(r['1proc']['eval_s'], 1e-9):.2f}x, whole wall "
              f"{r['2proc']['wall_s'] / r['1proc']['wall_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
