"""Sampling from a DCGAN generator and loading one from a checkpoint.

The trainer (``trainers/gan.py``) and the evaluation (``trainers/gan_eval.py``) both import
this module; it imports neither, so the two never import each other in a circle.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.dcgan import LATENT_DIM, Generator
from trainers.checkpoint import read_meta, resolve_checkpoint
from trainers.cli import UsageError
from trainers.runtime import generator_for

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


@torch.no_grad()
def calibrate_batchnorm(generator: nn.Module, seed: int, batches: int, size: int) -> nn.Module:
    """Re-estimate BatchNorm's running statistics from ``batches`` x ``size`` fixed z (a cumulative
    average); return the generator in eval mode. Averaged (EMA) weights do not match the live
    generator's statistics, so the EMA generator is calibrated before it samples."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    generator.train()
    device = next(generator.parameters()).device
    latent = generator.latent_dim
    for k in range(batches):
        generator(noise(size, latent, seed, BN_STREAM, k).to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
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
