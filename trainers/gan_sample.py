"""Write a trained generator's samples as a tensor file or a PNG grid.

    python trainers/gan.py sample --checkpoint runs/<run> --n 64 --out grid.png
    python trainers/gan.py sample --checkpoint runs/<run> --n 10000 --out samples.pt   # for evaluate --images

The images are those the run's metrics score: ``--n`` z drawn with ``--seed`` from the sample
stream, decoded by the run's reported generator (the EMA one if the run kept one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

import torch
import tyro

from trainers.cli import DIST_TIMEOUT_S, UsageError, parse, require_at_least, require_writable_file
from trainers.files import atomic_path
from trainers.gan_sampling import checkpoint_generator, command_device, generate, job_processes, save_grid
from trainers.runtime import collective_failures


@dataclass
class SampleConfig:
    checkpoint: str = ""  # a run folder, its checkpoints/ folder or one checkpoints/step_* folder
    n: Annotated[int, tyro.conf.arg(aliases=("--num-images",))] = 64  # number of images (--num-images under torchrun or accelerate launch, whose own parsers take --n for theirs)
    out: str = "samples.png"  # output: .pt (an N x 1 x 28 x 28 tensor in [-1, 1]) or .png (a grid)
    seed: int = 0  # seed of the z draws

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("sample: --checkpoint is required (a run folder or a checkpoints/step_* folder)")
        require_at_least(self.n, 1, "n")
        if Path(self.out).suffix not in (".pt", ".png"):
            raise UsageError(f"sample: --out must end in .pt or .png, got {self.out!r}")


def sample_main(argv: Sequence[str] | None = None) -> Path:
    """With several processes each rank generates its share and rank 0 writes the whole set."""
    cfg = parse(SampleConfig, argv, prog="trainers/gan.py sample",
                description="Write N generated images as a .pt tensor or a .png grid.")
    out = Path(cfg.out)
    require_writable_file(out, "--out")
    generator, _ = checkpoint_generator(cfg.checkpoint)
    accelerator, shards = job_processes(out.parent)
    generator.to(command_device(accelerator))
    with collective_failures(shards.world, DIST_TIMEOUT_S, None):
        part = shards.part(cfg.n)
        images = shards.gather(generate(generator, cfg.n, cfg.seed, part=part), cfg.n)   # (n, 1, 28, 28)
    if accelerator is not None:
        accelerator.end_training()
    if not shards.is_main:
        return out
    if out.suffix == ".pt":
        with atomic_path(out) as tmp:
            torch.save(images, tmp)
    else:
        save_grid(images, out, nrow=math.ceil(math.sqrt(cfg.n)))
    print(f"wrote {cfg.n} images to {out}")
    return out
