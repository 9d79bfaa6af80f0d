"""Where a GAN iteration's milliseconds go, on 1 or 2 CPU processes: torch.profiler over the trainer.

    OMP_NUM_THREADS=1 python benchmarks/gan_profile.py                                   # 1 process
    OMP_NUM_THREADS=1 accelerate launch --config_file launch/cpu_2proc.yaml benchmarks/gan_profile.py
    OMP_NUM_THREADS=1 accelerate launch --config_file launch/cpu_2proc.yaml benchmarks/gan_profile.py --batchnorm local

It runs ``trainers/gan.py``'s ``train`` (cpu-demo's settings, no evaluation) for ``--warmup`` untimed
iterations, then profiles ``--steps`` more on every rank, and prints rank 0's milliseconds per iteration
by kind of work: convolutions (forward and backward), BatchNorm, the all-reduces (BatchNorm's, DDP's
gradient buckets, the stop check), the Adam steps, the rest of the ops, and the time outside any op
(Python, Accelerate, DDP's hooks, waiting). With ``--json`` the rows are also written to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity, profile, schedule

from trainers.gan import make_config, train

# profiler op name -> kind (first match wins); self CPU time is summed per kind
KINDS = (("all-reduce", ("allreduce", "all_reduce", "gloo", "c10d")),
         ("convolution", ("convolution", "conv2d", "conv_transpose", "mkldnn_conv", "_convolution")),
         ("batchnorm", ("batch_norm", "native_batch_norm")),
         ("adam", ("adam", "Optimizer.step")),
         ("autocast casts", ("aten::_to_copy", "aten::copy_", "aten::to")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n.lower() in low for n in needles):
            return kind
    return "other ops"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="profiled iterations")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--batchnorm", choices=("global", "local"), default="global")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 2:
        p.error("--steps must be at least 1 and --warmup at least 2")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    total = args.warmup + args.steps
    window = schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1)
    prof = profile(activities=[ProfilerActivity.CPU], schedule=window)
    # one profiler step per optimiser step of D (once per iteration): the loop itself is untouched
    hook = register_optimizer_step_post_hook(
        lambda opt, a, k: prof.step() if opt is optimisers[0] else None)
    optimisers: list = []
    pre = register_optimizer_step_pre_hook(
        lambda opt, a, k: optimisers.append(opt) if not optimisers else None)
    with tempfile.TemporaryDirectory() as tmp, prof:
        cfg = make_config("cpu-demo", base_channels=args.base_channels, batch_size=args.batch_size,
                          max_steps=total, wandb=False, progress=False, eval_metrics=False, stages="0",
                          checkpoint_every=10 ** 9, batchnorm=args.batchnorm, out_dir=tmp, run_name="profile")
        metrics = train(cfg)
    hook.remove()
    pre.remove()
    events = prof.key_averages()
    per_iter = {}
    for e in events:
        if e.key.startswith("ProfilerStep"):
            continue
        kind = kind_of(e.key)
        per_iter[kind] = per_iter.get(kind, 0.0) + e.self_cpu_time_total / 1000 / args.steps
    steps_ms = [e.cpu_time_total / 1000 / e.count for e in events if e.key.startswith("ProfilerStep")]   # one key per step
    iteration = sum(steps_ms) / len(steps_ms) if steps_ms else sum(per_iter.values())
    per_iter["outside ops (Python, hooks, waits)"] = max(0.0, iteration - sum(per_iter.values()))
    result = {"processes": world, "batchnorm": args.batchnorm, "base_channels": args.base_channels,
              "batch_size": args.batch_size, "iteration_ms": iteration,
              "images_per_s": metrics["train_images_per_s"], "ms_per_iteration": per_iter}
    if rank == 0:
        print(f"{world} process(es), --batchnorm {args.batchnorm}, b={args.base_channels}, batch {args.batch_size} "
              f"per process: {iteration:.1f} ms per iteration (profiled), {metrics['train_images_per_s']:.0f} images/s "
              f"(unprofiled iterations included)")
        for kind, ms in sorted(per_iter.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<38}{ms:8.2f} ms  {ms / iteration:6.1%}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
