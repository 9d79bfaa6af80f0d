"""Sampling from a DCGAN generator, loading one from a checkpoint, and the image grid.

The trainer (``trainers/gan.py``), the metrics and the sample, evaluate and interpolate commands
all import this module; it imports none of them, so they never import each other in a circle.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from models.dcgan import LATENT_DIM, Generator
from trainers.checkpoint import read_meta, resolve_checkpoint
from trainers.cli import UsageError
from trainers.files import atomic_path
from trainers.runtime import SINGLE, Shards, generator_for, launched_processes, make_accelerator

BN_STREAM = 1_004         # seed key of the z that re-estimate an EMA generator's BatchNorm statistics
SAMPLE_STREAM = 1_005     # seed key of the z behind `sample`, the stage metrics and the final metrics
BN_CALIBRATION = (8, 256)  # batches x size of z used to re-estimate the EMA generator's BatchNorm stats
G_WEIGHTS = "model.safetensors"          # accelerate's name for the first prepared model (G)
EMA_WEIGHTS = "custom_checkpoint_0.pkl"  # ... and for the first object registered for checkpointing


def noise(n: int, latent_dim: int, *keys: int) -> torch.Tensor:
    """``(n, latent_dim)`` standard normal z, a pure function of ``keys``."""
    return torch.randn(n, latent_dim, generator=generator_for(*keys))


def unwrap(generator: nn.Module) -> nn.Module:
    return getattr(generator, "module", generator)   # DDP / accelerate wrappers


@torch.no_grad()
def generate(generator: nn.Module, n: int, seed: int, batch: int = 500,
             part: range | None = None) -> torch.Tensor:
    """``n`` images ``(n, 1, 28, 28)`` in [-1, 1] on the CPU, from z drawn with ``seed``.

    ``part`` (a range of indices into the n) makes only those images: the same pixels as the
    matching rows of the whole set, so processes can share the work and gather the parts."""
    generator = unwrap(generator)
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    z = noise(n, generator.latent_dim, seed, SAMPLE_STREAM)                   # (n, latent)
    if part is not None:
        z = z[part.start:part.stop]
    out = [generator(z[i:i + batch].to(device)).float().cpu() for i in range(0, len(z), batch)]
    generator.train(was_training)
    if not out:
        return torch.empty(0, 1, 28, 28)
    return torch.cat(out).clamp_(-1, 1)


def calibrate_batchnorm(generator: nn.Module, seed: int, batches: int, size: int) -> nn.Module:
    """Re-estimate BatchNorm's running statistics from ``batches`` x ``size`` fixed z (torch's
    ``update_bn``: statistics reset, then a cumulative average); return the generator in eval mode.
    Averaged (EMA) weights do not match the live generator's statistics, so the EMA generator is
    calibrated before it samples."""
    latent = generator.latent_dim
    update_bn((noise(size, latent, seed, BN_STREAM, k) for k in range(batches)), generator,
              device=next(generator.parameters()).device)
    return generator.eval()


def load_generator_state(checkpoint_path: str | Path) -> tuple[Generator, dict]:
    """The generator whose samples the run reports (the EMA one if the run kept one, its BatchNorm
    statistics re-estimated as the trainer does), in eval mode on the CPU, and the run's config as saved. ``checkpoint_path``: a run, checkpoints/ or
    step folder."""
    ckpt = resolve_checkpoint(Path(checkpoint_path))
    config = read_meta(ckpt).get("config", {})
    generator = Generator(config.get("latent_dim", LATENT_DIM), config.get("base_channels", 128))
    try:
        if config.get("ema_decay", 0) > 0:
            state = torch.load(ckpt / EMA_WEIGHTS, map_location="cpu", weights_only=True)
            state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        else:
            from safetensors.torch import load_file
            state = load_file(str(ckpt / G_WEIGHTS))
        generator.load_state_dict(state)
    except Exception as err:  # missing, truncated or foreign files
        raise UsageError(f"checkpoint {ckpt} cannot be loaded ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else ''}); pass another checkpoint") from None
    if config.get("ema_decay", 0) > 0:   # as the trainer does before every EMA sample: any checkpoint
        calibrate_batchnorm(generator, config.get("seed", 0), *BN_CALIBRATION)   # samples like the run's final
    return generator.eval(), config


def checkpoint_generator(checkpoint: str | Path) -> tuple[Generator, Path]:
    """A checkpoint's generator (as ``load_generator_state``: eval mode, on the CPU) and the run
    folder it belongs to. Loaded before any process group exists, so a bad checkpoint costs nothing."""
    ckpt = resolve_checkpoint(Path(checkpoint))
    generator, _ = load_generator_state(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return generator, run_dir


def run_tags(checkpoint: str) -> list[str]:
    """Tags of a run made from a checkpoint: its preset and width (``images`` without one)."""
    if not checkpoint:
        return ["images"]
    config = read_meta(resolve_checkpoint(Path(checkpoint))).get("config", {})
    return [str(config.get("preset", "gan")), f"b{config.get('base_channels', '?')}"]


# --- the commands' processes ------------------------------------------------------------------

def job_processes(out: Path, use_wandb: bool = False):
    """``(accelerator or None, shards)`` for a command: under ``accelerate launch`` or torchrun
    with several processes, the ranks share the work; alone, no process group is made unless
    wandb needs an Accelerator."""
    if launched_processes() == 1 and not use_wandb:
        return None, SINGLE
    accelerator = make_accelerator("no", use_wandb, out)
    return accelerator, Shards(accelerator)


def command_device(accelerator=None) -> torch.device:
    """Where a command's models run: the Accelerator's device (each rank its own GPU), else the
    GPU if there is one, else the CPU."""
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- image grids ----------------------------------------------------------------------------------

def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Images in [-1, 1] -> a PNG grid of ``nrow`` columns, written atomically."""
    from torchvision.utils import save_image
    with atomic_path(path) as tmp:
        save_image(images.float().cpu(), tmp, format="png", nrow=nrow, normalize=True, value_range=(-1, 1),
                   pad_value=1.0)
    return Path(path)
