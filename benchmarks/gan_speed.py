"""Images/s of trainers/gan.py's loop against a plain PyTorch loop (no Accelerate), same run.

    python benchmarks/gan_speed.py                       # cpu-demo's width, bf16 and 1 thread; batch 32
    python benchmarks/gan_speed.py --variants all        # + channels_last, torch.compile, batch sizes, fp32
    python benchmarks/gan_speed.py --mixed-precision no --batch-size 64 --steps 60 --rounds 5

Both loops train the same model (``models/dcgan.py``) on the same batches, noise and
precision, and their weights agree (``tests/test_gan.py`` checks this against
``plain_train``). Each round runs every variant once, in turn, so load from other users of
the machine hits all of them alike; the medians over rounds are reported with the ratio
to the plain loop of the same round. The trainer's images/s is its own ``train_images_per_s``
(the loop's wall time minus stages and checkpoints: logging, EMA and bookkeeping are in).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers.cli import override
from trainers.files import write_json_atomic
from trainers.gan import (GANConfig, build_models, epoch_batches, iterations_per_epoch,
                          load_train_images, make_config, step_noise, train)


def trainer_device() -> torch.device:
    """Where ``train`` runs in one process: the GPU if there is one (Accelerate's choice), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plain_train(cfg: GANConfig, images: torch.Tensor, steps: int, compile_models: bool = False,
                device: torch.device | str = "cpu", fused_adam: bool = False):
    """The reference: the DCGAN loop in plain PyTorch, one process, no Accelerate, no EMA, written
    as pytorch/examples' dcgan/main.py writes it (D's gradients computed in the G step, the losses
    read every iteration), on ``device`` with the data moved there once.

    ``fused_adam``: the trainer's optimiser instead of the example's (for the tests' weight comparison).
    Returns ``(G, D, seconds)`` where seconds covers the ``steps`` iterations only.
    """
    device = torch.device(device)
    G, D = (m.to(device) for m in build_models(cfg))
    images = images.to(device)
    if cfg.optim.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    adam = dict(betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused_adam or None)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr, **adam)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d or cfg.optim.lr, **adam)   # D's own --lr-d
    G_run, D_run = (torch.compile(G), torch.compile(D)) if compile_models else (G, D)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.optim.mixed_precision == "bf16")
    iters = iterations_per_epoch(len(images), cfg.optim.batch_size, 1)
    ones, zeros = torch.ones(cfg.optim.batch_size, device=device), torch.zeros(cfg.optim.batch_size, device=device)
    batches, batches_epoch = None, -1
    start = time.perf_counter()
    for step in range(1, steps + 1):
        epoch, it = (step - 1) // iters + 1, (step - 1) % iters
        if batches_epoch != epoch:
            batches, batches_epoch = epoch_batches(cfg, len(images), 0, 1, epoch).to(device), epoch
        real = images[batches[it]]
        if cfg.optim.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = step_noise(cfg, 0, 1, step).to(device)
        with autocast:                                   # D: maximise log D(x) + log(1 - D(G(z)))
            fake = G_run(z)
            logit_real, logit_fake = D_run(real).float(), D_run(fake.detach()).float()
        loss_d = F.binary_cross_entropy_with_logits(logit_real, ones) + \
            F.binary_cross_entropy_with_logits(logit_fake, zeros)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with autocast:                                   # G: maximise log D(G(z))
            logit_gen = D_run(fake).float()
        loss_g = F.binary_cross_entropy_with_logits(logit_gen, ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        loss_d.item(), loss_g.item()                     # as the example prints them every iteration
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return G, D, time.perf_counter() - start


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def trainer_images_per_s(cfg: GANConfig, out_dir: str, name: str) -> float:
    metrics = train(override(cfg, out_dir=out_dir, run_name=name))
    return metrics["train_images_per_s"]


def variants(base: GANConfig, which: str) -> dict[str, tuple[GANConfig, str]]:
    """name -> (config, loop): loop is "trainer", "plain" or "plain+compile"."""
    out = {"plain": (base, "plain"), "trainer": (base, "trainer"),
           "trainer + EMA": (override(base, ema_decay=0.999), "trainer")}
    if which == "all":
        cl = override(base, channels_last=True)
        out["trainer channels_last"] = (cl, "trainer")
        out["plain torch.compile"] = (base, "plain+compile")
        for bs in (64, 128):
            out[f"trainer batch {bs}"] = (override(base, batch_size=bs), "trainer")
        other = "no" if base.optim.mixed_precision == "bf16" else "bf16"
        out[f"trainer {other}"] = (override(base, mixed_precision=other), "trainer")
        out[f"plain {other}"] = (override(base, mixed_precision=other), "plain")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-channels", type=int, default=16, help="width b (cpu-demo's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per iteration")
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16", help="autocast (cpu-demo's)")
    p.add_argument("--steps", type=int, default=40, help="timed iterations per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (cpu-demo's)")
    p.add_argument("--variants", choices=("baseline", "all"), default="baseline",
                   help="baseline: trainer vs plain; all: + channels_last, compile, batch sizes, bf16")
    p.add_argument("--json", default="", help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = make_config("cpu-demo", base_channels=args.base_channels, batch_size=args.batch_size,
                       max_steps=args.steps, wandb=False, progress=False, eval_metrics=False,
                       stages="0", checkpoint_every=10 ** 9, num_threads=args.threads, ema_decay=0.0,
                       mixed_precision=args.mixed_precision)
    table = variants(base, args.variants)
    speeds: dict[str, list[float]] = {k: [] for k in table}
    ratios: dict[str, list[float]] = {k: [] for k in table}
    images, device = load_train_images(base), trainer_device()
    print(f"{device_name(device)}, threads {torch.get_num_threads()}, b={args.base_channels}, batch {args.batch_size}, {args.mixed_precision}, "
          f"{args.steps} iterations x {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (cfg, loop) in table.items():
                if loop == "trainer":
                    speed = trainer_images_per_s(cfg, tmp, f"r{r}-{name.replace(' ', '_')}")
                else:
                    if loop == "plain+compile":   # compile outside the timed window
                        plain_train(cfg, images, 3, compile_models=True, device=device)
                    _, _, secs = plain_train(cfg, images, args.steps, compile_models=loop == "plain+compile",
                                             device=device)
                    speed = args.steps * cfg.optim.batch_size / secs
                speeds[name].append(speed)
            for name in table:
                ratios[name].append(speeds[name][-1] / speeds["plain"][-1])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in speeds.items()), flush=True)
    print(f"\n{'variant':<24}{'images/s (median)':>18}{'vs plain (median)':>20}")
    result = {}
    for name in table:
        med, ratio = statistics.median(speeds[name]), statistics.median(ratios[name])
        result[name] = {"images_per_s": med, "ratio_vs_plain": ratio}
        print(f"{name:<24}{med:>18.0f}{ratio:>19.2f}x")
    print(f"\ngoal trainer/plain >= 1.05x: {result['trainer']['ratio_vs_plain']:.2f}x")
    if args.json:
        write_json_atomic(Path(args.json), {"device": device_name(device), "threads": args.threads,
                                            "base_channels": args.base_channels, "batch_size": args.batch_size,
                                            "mixed_precision": args.mixed_precision, "steps": args.steps,
                                            "rounds": args.rounds, "variants": result})
    return result


if __name__ == "__main__":
    main()
