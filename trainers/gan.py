"""Train the DCGAN on MNIST under HF Accelerate; sample, evaluate and interpolate any checkpoint.

    accelerate launch trainers/gan.py                          # preset auto: paper on CUDA, cpu-demo otherwise
    accelerate launch trainers/gan.py --preset paper --mixed-precision bf16
    accelerate launch --config_file launch/cpu_2proc.yaml trainers/gan.py --preset cpu-demo
    python trainers/gan.py --resume --run-name <run>           # continue from the last checkpoint
    python trainers/gan.py sample --checkpoint runs/<run> --n 64 --out grid.png   # or --out images.pt
    python trainers/gan.py evaluate --checkpoint runs/<run>    # FID, classifier score, class histogram
    python trainers/gan.py interpolate --checkpoint runs/<run> --mode both --out runs/<run>/interp

Writes <out-dir>/<run-name>/{samples/epoch_XXX.png, samples/final.png, figures/{stages,three_panel,
losses}.png, metrics.json, checkpoints/step_*/}. --batch-size is per process: with N processes the
global batch is N x batch-size, and each rank reads its own shard of every epoch's permutation.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import trainers.gan_eval as gan_eval
from data.mnist import load_mnist, to_unit_range
from models.dcgan import ALL_REDUCE_STATS, LATENT_DIM, Discriminator, Generator, synchronise_batchnorm
from trainers.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint, write_json_atomic
from trainers.cli import (UsageError, arg, make_parser, require_at_least, require_non_negative,
                          require_positive, require_writable_file, run_cli, validate_field_choices)
from trainers.figures import plt, save_figure, smooth
from trainers.gan_sampling import BN_CALIBRATION, calibrate_batchnorm, generate, load_generator_state, noise
from trainers.runtime import (DIST_TIMEOUT_S, MIXED_PRECISION, RunConfig, Shards, StopFlag, check_run_dir_is_free,
                              collective_failures, fingerprint, gather_fingerprints, generator_for,
                              launched_processes, make_accelerator)
from trainers.tracking import start_tracker

PRESET_NAMES = ("auto", "paper", "cpu-demo")
SUBCOMMANDS = ("train", "sample", "evaluate", "interpolate")
GRID_SIDE = 8            # fixed-noise grids are 8 x 8
DATA_STREAM = 1_001      # seed keys: every random stream is a pure function of (seed, key, ...)
NOISE_STREAM = 1_002
FIXED_STREAM = 1_003
SUMMARY_KEYS = ("steps", "epochs_done", "finished", "wall_time_s", "train_images_per_s", "eval_time_s",
                "skipped_steps_d", "skipped_steps_g")   # metrics.json numbers the run's summary repeats


@dataclass
class GANConfig(RunConfig):
    # The defaults are the report's configuration (the paper preset); cpu-demo overrides a few.
    preset: str = arg("auto", "paper (the report's), cpu-demo (minutes on a CPU) or auto: paper on CUDA, "
                      "cpu-demo otherwise; explicit flags override the preset", "preset", PRESET_NAMES)
    # data
    data_dir: str = arg("", "folder holding MNIST/raw/*.gz (default: the repo's data/)", "data")
    train_subset: int = arg(0, "train on the first N training images only (0: all 60,000)", "data")
    # model
    base_channels: int = arg(128, "width b of G and D (the report's 128)", "model")
    latent_dim: int = arg(LATENT_DIM, "size of z", "model")
    # optimisation
    epochs: int = arg(50, "passes over the training set (the report: 50, up to 200)", "optimisation")
    max_steps: int = arg(0, "stop after this many iterations (0: run every epoch); for tests", "optimisation")
    batch_size: int = arg(128, "images per iteration, per process", "optimisation")
    lr: float = arg(2e-4, "Adam learning rate of D and G", "optimisation")
    beta1: float = arg(0.5, "Adam beta1 (DCGAN's 0.5)", "optimisation")
    beta2: float = arg(0.999, "Adam beta2", "optimisation")
    ema_decay: float = arg(0.0, "decay of an EMA of G's weights used for samples (0: off)", "optimisation")
    mixed_precision: str = arg("no", "autocast precision (fp16 needs CUDA)", "optimisation", MIXED_PRECISION)
    channels_last: bool = arg(False, "NHWC memory format for G and D", "optimisation")
    num_threads: int = arg(0, "torch CPU threads per process (0: torch's default)", "optimisation")
    # evaluation
    stages: str = arg("0,1,5,10,20,30,40,50", "epochs after which the fixed-noise grid is saved "
                      "(0: before any step); stages past --epochs are dropped", "evaluation")
    log_every: int = arg(50, "iterations between train/* scalars", "evaluation")
    eval_metrics: bool = arg(True, "at each stage and at the end, compute the metrics of trainers/gan_eval.py "
                             "(FID, classifier score, class histogram) and the latent walks; with several "
                             "processes every rank scores its share", "evaluation")
    stage_samples: int = arg(gan_eval.STAGE_SAMPLES, "images scored at each stage", "evaluation")
    eval_samples: int = arg(gan_eval.FULL_SAMPLES, "images scored at the end (the real floor uses 10,000)",
                            "evaluation")
    # logging and run: RunConfig's fields (wandb, out_dir, run_name, seed, resume, checkpoints, ...)

    def validate(self) -> None:
        validate_field_choices(self)
        for name in ("lr",):
            require_positive(self.lr, name)
        for name in ("beta1", "beta2", "ema_decay"):
            value = getattr(self, name)
            require_non_negative(value, name)
            if value >= 1:
                raise UsageError(f"--{name.replace('_', '-')} must be below 1, got {value!r}")
        for name in ("epochs", "batch_size", "base_channels", "latent_dim", "log_every",
                     "checkpoint_every", "keep_checkpoints", "dist_timeout"):
            require_at_least(getattr(self, name), 1, name)
        for name in ("max_steps", "train_subset", "num_threads"):
            require_at_least(getattr(self, name), 0, name)
        for name in ("stage_samples", "eval_samples"):
            require_at_least(getattr(self, name), 2, name)
        self.stage_list()

    def stage_list(self) -> list[int]:
        """The stages as sorted epochs in [0, epochs]; UsageError for anything else."""
        try:
            stages = sorted({int(s) for s in self.stages.split(",") if s.strip()})
        except ValueError:
            raise UsageError(f"--stages must be comma-separated epochs like 0,1,5, got {self.stages!r}") from None
        if not stages or stages[0] < 0:
            raise UsageError(f"--stages must list epochs >= 0, got {self.stages!r}")
        return [s for s in stages if s <= self.epochs]

    def default_name(self) -> str:
        return f"gan-{self.preset}-b{self.base_channels}-s{self.seed}"


# Presets override only what differs from the dataclass defaults (the report's configuration).
PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu-demo": {
        "base_channels": 16,        # G costs ~b^2: b=16 runs ~4x faster than b=32 on a CPU
        "epochs": 6,                # ~7-8 minutes of training on a 2-core CPU
        "batch_size": 32,           # more updates per image: better than 64 for the same minutes
        "mixed_precision": "bf16",  # ~1.3-1.5x faster than fp32 on an AVX-512 CPU (benchmarks/gan_speed.py)
        "stages": "0,1,2,3,4,5,6",
        "ema_decay": 0.999,         # samples from an EMA of G's weights
        "checkpoint_every": 500,
        "log_every": 25,
        "num_threads": 1,           # one thread avoids OpenMP spin-waits on a shared 2-core CPU
    },
}


def auto_preset() -> str:
    return "paper" if torch.cuda.is_available() else "cpu-demo"


def make_config(preset: str = "auto", **overrides) -> GANConfig:
    """The config of ``preset`` (auto resolved) with ``overrides`` on top, validated."""
    if preset not in PRESET_NAMES:
        raise UsageError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {preset!r}")
    resolved = auto_preset() if preset == "auto" else preset
    unknown = set(overrides) - {f.name for f in fields(GANConfig)}
    if unknown:
        raise TypeError(f"unknown GANConfig fields: {sorted(unknown)}")
    cfg = GANConfig(**{**PRESETS[resolved], **overrides, "preset": resolved})
    cfg.validate()
    return cfg


def parse_train_args(argv: Sequence[str] | None) -> GANConfig:
    """CLI -> config: the preset's values, then every flag given explicitly."""
    parser = make_parser(GANConfig, __doc__.splitlines()[0] + " Subcommands: " + ", ".join(SUBCOMMANDS)
                         + " (train is the default).", prog="trainers/gan.py")
    ns = parser.parse_args(argv)
    for action in parser._actions:  # a second parse with no defaults tells which flags were given
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    preset = given.pop("preset", ns.preset)
    cfg = make_config(preset, **given)
    if preset == "auto" and int(os.environ.get("RANK", "0")) == 0:
        why = "a CUDA device is present" if cfg.preset == "paper" else "no CUDA device"
        print(f"preset auto -> {cfg.preset} ({why}); pass --preset to choose", flush=True)
    return cfg


# --- data --------------------------------------------------------------------------------------

def load_train_images(cfg: GANConfig) -> torch.Tensor:
    """The md5-checked MNIST training images in [-1, 1], ``(N, 1, 28, 28)``."""
    images, _ = load_mnist("train", cfg.data_dir or None)
    if cfg.train_subset:
        images = images[: cfg.train_subset]
    return to_unit_range(images)


def iterations_per_epoch(n_images: int, batch_size: int, world: int) -> int:
    return (n_images // world) // batch_size


def epoch_batches(cfg: GANConfig, n_images: int, rank: int, world: int, epoch: int) -> torch.Tensor:
    """``(iterations, batch)`` image indices of ``rank`` in ``epoch`` (1-based).

    One permutation per epoch, a pure function of (seed, epoch); rank r takes every world-th
    index from r, so the ranks' shards are disjoint and cover the epoch. The last partial batch
    is dropped, so every rank runs the same number of iterations.
    """
    perm = torch.randperm(n_images, generator=generator_for(cfg.seed, DATA_STREAM, epoch))
    shard = perm[rank::world]
    iters = iterations_per_epoch(n_images, cfg.batch_size, world)
    return shard[: iters * cfg.batch_size].view(iters, cfg.batch_size)


def step_noise(cfg: GANConfig, rank: int, world: int, step: int) -> torch.Tensor:
    """``(batch, latent)`` z of ``rank`` at ``step``: its rows of the global batch's z, a pure function
    of (seed, step). Together the ranks draw exactly the z that one process with ``world`` times the
    batch would draw, so a run on N processes follows the one-process run (the key 0 keeps that
    one-process stream as it has always been)."""
    z = noise(cfg.batch_size * world, cfg.latent_dim, cfg.seed, NOISE_STREAM, 0, step)   # (world B, latent)
    return z[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]


def fixed_noise(cfg: GANConfig) -> torch.Tensor:
    """The z of every stage grid, the same for the whole run."""
    return noise(GRID_SIDE * GRID_SIDE, cfg.latent_dim, cfg.seed, FIXED_STREAM)


# --- models ------------------------------------------------------------------------------------

def build_models(cfg: GANConfig) -> tuple[Generator, Discriminator]:
    torch.manual_seed(cfg.seed)
    return Generator(cfg.latent_dim, cfg.base_channels), Discriminator(cfg.base_channels)


class EMA(nn.Module):
    """An exponential moving average of G's weights, with warm-up: decay_t = min(decay, (1+t)/(10+t)).

    Its BatchNorm statistics are re-estimated from fresh z before it samples (``calibrate``),
    since averaged weights do not match the live generator's running statistics.
    """

    def __init__(self, generator: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        self.updates += 1
        t = float(self.updates)
        decay = min(self.decay, (1 + t) / (10 + t))
        for ema_p, p in zip(self.module.parameters(), generator.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - decay)

    @torch.no_grad()
    def calibrate(self, seed: int) -> nn.Module:
        """Re-estimate BatchNorm running stats (cumulative average over fixed z); return G in eval mode."""
        batches, size = BN_CALIBRATION
        return calibrate_batchnorm(self.module, seed, batches, size)


# --- checkpoints -------------------------------------------------------------------------------

def config_from_meta(meta: dict) -> GANConfig:
    known = {f.name for f in fields(GANConfig)}
    return GANConfig(**{k: v for k, v in meta.get("config", {}).items() if k in known})


def load_generator(checkpoint_path: str | Path) -> tuple[Generator, GANConfig]:
    """The generator whose samples the run reports (the EMA one if the run kept one), in eval
    mode on the CPU, and the run's config. ``checkpoint_path``: a run, checkpoints/ or step folder."""
    generator, config = load_generator_state(checkpoint_path)
    return generator, config_from_meta({"config": config})


def check_resumable(cfg: GANConfig, saved: GANConfig) -> None:
    for name in ("base_channels", "latent_dim", "batch_size", "train_subset", "seed", "ema_decay"):
        if getattr(cfg, name) != getattr(saved, name):
            raise UsageError(f"--resume: the checkpoint was trained with --{name.replace('_', '-')} "
                             f"{getattr(saved, name)}, not {getattr(cfg, name)}; pass the same value")


# --- figures -----------------------------------------------------------------------------------

def save_grid(images: torch.Tensor, path: Path, nrow: int = GRID_SIDE) -> Path:
    """Images in [-1, 1] -> a PNG grid, written atomically."""
    from torchvision.utils import save_image
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    save_image(images.float().cpu(), tmp, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)
    os.replace(tmp, path)
    return path


def stage_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / "samples" / f"epoch_{epoch:03d}.png"


def plot_stages(paths: list[tuple[str, Path]], path: Path, title: str) -> Path:
    """The grids side by side, titled (used for the evolution and the start/middle/end figures)."""
    import matplotlib.image as mpimg
    fig, axes = plt.subplots(1, len(paths), figsize=(2.6 * len(paths), 3.0), squeeze=False)
    for ax, (label, png) in zip(axes[0], paths):
        ax.imshow(mpimg.imread(png), cmap="gray")
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_losses(history: dict[str, list[float]], iters_per_epoch: int, path: Path) -> Path:
    """Per-iteration D and G loss, D(x) and D(G(z)): raw (faint) and smoothed."""
    steps = list(range(1, len(history["loss_d"]) + 1))
    window = max(1, min(100, len(steps) // 20))
    fig, (ax_loss, ax_prob) = plt.subplots(1, 2, figsize=(12, 4))
    for ax, keys in ((ax_loss, (("loss_d", "D loss"), ("loss_g", "G loss (non-saturating)"))),
                     (ax_prob, (("d_x", "D(x)"), ("d_g_z", "D(G(z)) before the D step")))):
        for key, label in keys:
            line, = ax.plot(steps, smooth(history[key], window), label=f"{label}, mean of {window}")
            ax.plot(steps, history[key], color=line.get_color(), alpha=0.15, lw=0.5)
        ax.set(xlabel=f"iteration ({iters_per_epoch} per epoch)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set(title="losses", ylabel="BCE")
    ax_prob.set(title="discriminator outputs", ylabel="mean probability of 'real'", ylim=(0, 1))
    return save_figure(fig, path)


# --- the loop ----------------------------------------------------------------------------------

def train(cfg: GANConfig) -> dict:
    """Train under an Accelerator (``accelerate launch`` decides devices and processes); return
    the final metrics, also written to ``<run>/metrics.json``. A collective that fails or times
    out (a dead or stuck rank) ends the job with a one-line JobFailure; checkpoints are kept."""
    cfg.validate()
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    check_run_dir_is_free(run_dir, cfg.resume)
    resume_from = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if resume_from is not None:
        check_resumable(cfg, config_from_meta(read_meta(resume_from)))
    images = load_train_images(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with collective_failures(launched_processes(), cfg.dist_timeout, ckpt_dir):
        return train_loop(cfg, images, resume_from)


def train_loop(cfg: GANConfig, images: torch.Tensor, resume_from: Path | None) -> dict:
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"

    from accelerate.utils import DistributedDataParallelKwargs
    # Synchronised BatchNorm keeps every rank's BatchNorm buffers equal, so DDP need not
    # broadcast them (broadcasting in place between D's real and fake passes breaks autograd).
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb, run_dir,
                                   [DistributedDataParallelKwargs(broadcast_buffers=False)], cfg.dist_timeout)
    rank, world, device, config = accelerator.process_index, accelerator.num_processes, accelerator.device, asdict(cfg)
    shards = Shards(accelerator)   # how the ranks share the evaluation
    iters = iterations_per_epoch(len(images), cfg.batch_size, world)
    if iters < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} x {world} processes exceeds the {len(images)} "
                         "training images; lower --batch-size or raise --train-subset")
    total = cfg.epochs * iters if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * iters)

    G, D = build_models(cfg)
    ema = EMA(G, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if world > 1:  # batch statistics over the global batch, identical buffers on every rank
        G, D = synchronise_batchnorm(G, device.type), synchronise_batchnorm(D, device.type)
    if cfg.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    G, D, opt_g, opt_d = accelerator.prepare(G, D, opt_g, opt_d)
    # Under mixed precision `prepare` wraps each module's forward in autocast plus a cast of its
    # outputs to fp32: four wrapped calls and casts per iteration. One `accelerator.autocast()`
    # per step instead (as in the plain loop) saves ~2% here; strip the per-module wrappers.
    for model in (G, D):
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    G_plain = accelerator.unwrap_model(G)

    start, wall_before = 0, 0.0
    history = {"loss_d": [], "loss_g": [], "d_x": [], "d_g_z": []}   # one value per iteration
    record = {"stages": {}, "skipped_d": 0, "skipped_g": 0}
    if resume_from is not None:
        meta = load_checkpoint(accelerator, resume_from)
        start, extra = meta["step"], meta["extra"]
        history, wall_before = extra["history"], extra["wall_time"]
        record = extra["record"]
        for opt in (opt_g, opt_d):   # the flags of this job win over the optimiser state's copy
            for group in opt.param_groups:
                group["lr"], group["betas"] = cfg.lr, (cfg.beta1, cfg.beta2)
        accelerator.print(f"resuming {run_dir.name} from iteration {start} ({resume_from.name})")

    tracker = start_tracker(accelerator, cfg.wandb_project, cfg.name, config, run_dir, cfg.wandb_group or None,
                            job_type=cfg.wandb_job_type, tags=[cfg.preset, f"b{cfg.base_channels}"])
    stop = StopFlag()
    z_fixed = fixed_noise(cfg)
    t0 = time.perf_counter()
    wall = lambda: wall_before + time.perf_counter() - t0  # noqa: E731
    aside = [0.0]   # seconds spent on stages and checkpoints, left out of the training speed
    evaluation = [0.0]   # seconds spent on stages and the final evaluation

    def sampler() -> nn.Module:
        """The generator whose samples we show: the EMA one (BatchNorm re-estimated) or G."""
        return ema.calibrate(cfg.seed) if ema is not None else G_plain.eval()

    def stage(epoch: int, step: int) -> None:
        """Grid and metrics of one stage. Every rank scores its share of the samples (collectives,
        same order on every rank); rank 0 alone writes the grid and logs."""
        tick = time.perf_counter()
        gen = sampler()   # equal weights on every rank, so equal samples
        numbers = gan_eval.stage_metrics(gen, device, shards, cfg.stage_samples) if cfg.eval_metrics else {}
        if accelerator.is_main_process:
            with torch.no_grad():
                grid = gen(z_fixed.to(device))
            png = save_grid(grid, stage_path(run_dir, epoch))
            record["stages"][str(epoch)] = {"step": step, **numbers}
            tracker.log(numbers | {"stage/epoch": epoch}, step=step)
            tracker.log_images({"samples/grid": png}, step=step, caption=f"epoch {epoch}, iteration {step}")
        G_plain.train()
        accelerator.wait_for_everyone()
        aside[0] += time.perf_counter() - tick
        evaluation[0] += time.perf_counter() - tick

    def checkpoint(at: int) -> Path:
        tick = time.perf_counter()
        path = save_checkpoint(accelerator, ckpt_dir, at, config, cfg.keep_checkpoints,
                               extra={"history": history, "wall_time": wall(), "record": record})
        aside[0] += time.perf_counter() - tick
        return path

    stages = cfg.stage_list()
    if start == 0 and 0 in stages:
        stage(0, 0)
    bar = tqdm(total=total, initial=start, desc=cfg.name, dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    ones = torch.ones(cfg.batch_size, device=device)
    zeros = torch.zeros(cfg.batch_size, device=device)
    pending: list[torch.Tensor] = []   # per-iteration stats kept on the device until the next log
    step, batches, batches_epoch = start, None, -1
    loop_start, aside[0] = time.perf_counter(), 0.0
    ALL_REDUCE_STATS.update(seconds=0.0, calls=0)
    G.train()
    D.train()
    for step in range(start + 1, total + 1):
        epoch, it = (step - 1) // iters + 1, (step - 1) % iters
        if batches_epoch != epoch:
            batches, batches_epoch = epoch_batches(cfg, len(images), rank, world, epoch), epoch
        real = images[batches[it]].to(device)                      # (B, 1, 28, 28)
        z = step_noise(cfg, rank, world, step).to(device)           # (B, latent)
        if cfg.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)

        # (1) D step: maximise log D(x) + log(1 - D(G(z)))
        with accelerator.autocast():
            fake = G(z)                                            # (B, 1, 28, 28)
            logit_real, logit_fake = D(real).float(), D(fake.detach()).float()   # (B,), (B,)
        loss_d = F.binary_cross_entropy_with_logits(logit_real, ones) + \
            F.binary_cross_entropy_with_logits(logit_fake, zeros)
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        opt_d.step()
        # (2) G step, non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z)))
        with accelerator.autocast():
            logit_gen = D(fake).float()                            # (B,)
        loss_g = F.binary_cross_entropy_with_logits(logit_gen, ones)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        opt_g.step()
        if ema is not None:
            ema.update(G_plain)
        record["skipped_d"] += int(opt_d.step_was_skipped)   # fp16: the scaler found inf/NaN grads
        record["skipped_g"] += int(opt_g.step_was_skipped)
        pending.append(torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(logit_real).mean().detach(),
                                    torch.sigmoid(logit_fake).mean().detach()]))
        bar.update(1)

        end_of_epoch = it == iters - 1
        if step % cfg.log_every == 0 or step == total or end_of_epoch:
            flush_stats(pending, history, step, cfg)
            last = {k: history[k][-1] for k in history}
            tracker.log({f"train/{k}": v for k, v in last.items()} |
                        {"train/epoch": step / iters, "train/skipped_d": record["skipped_d"],
                         "train/skipped_g": record["skipped_g"]}, step=step)
            bar.set_postfix(d=f"{last['loss_d']:.2f}", g=f"{last['loss_g']:.2f}", epoch=epoch)
        if end_of_epoch and epoch in stages:
            stage(epoch, step)
        stopping = stop.should_stop(accelerator)
        if step % cfg.checkpoint_every == 0 or end_of_epoch or step == total or stopping:
            flush_stats(pending, history, step, cfg)
            checkpoint(step)
        if stopping:
            accelerator.print(f"stop requested: checkpoint at iteration {step} written; rerun with --resume")
            break
    train_time = time.perf_counter() - loop_start - aside[0]
    bar.close()
    stop.restore()
    finished = step == total

    bn = ALL_REDUCE_STATS   # GlobalBatchNorm2d's all-reduces (CPU, several processes), this rank's
    metrics = {"bn_allreduce_s": round(bn["seconds"], 3), "bn_allreduce_calls": bn["calls"],
               "bn_allreduce_share": round(bn["seconds"] / max(train_time, 1e-9), 4),
               "steps": step, "epochs_done": step / iters, "iterations_per_epoch": iters,
               "finished": finished, "processes": world, "preset": cfg.preset,
               "wall_time_s": round(wall(), 2),
               "train_images_per_s": round((step - start) * cfg.batch_size * world / max(train_time, 1e-9), 1),
               "skipped_steps_d": record["skipped_d"], "skipped_steps_g": record["skipped_g"],
               "stages": record["stages"], "config": config}
    D_plain = accelerator.unwrap_model(D)
    metrics.update({  # collectives: every rank takes part (equal weights, distinct data across ranks)
        "rank_weight_fingerprints": gather_fingerprints(accelerator, fingerprint(
            *G_plain.state_dict().values(), *D_plain.state_dict().values())),
        "rank_data_fingerprints": gather_fingerprints(accelerator, fingerprint(
            epoch_batches(cfg, len(images), rank, world, 1)[0]))})
    tail = max(1, min(iters, len(history["loss_d"])))   # the last epoch's means
    metrics.update({f"last_epoch/{k}": sum(v[-tail:]) / tail for k, v in history.items() if v})
    tick = time.perf_counter()
    metrics.update(finish_run(cfg, run_dir, history, iters, stages, step, finished, sampler, device, tracker,
                              shards))   # every rank: the final evaluation is shared out
    evaluation[0] += time.perf_counter() - tick
    metrics.update({"eval_time_s": round(evaluation[0], 2),   # rank 0's, stages and final evaluation
                    "eval_images_per_rank": gather_fingerprints(accelerator, gan_eval.images_scored())})
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "metrics.json", metrics)
    tracker.summary({k: metrics[k] for k in SUMMARY_KEYS})   # end-of-run numbers (final/* come from gan_eval)
    accelerator.wait_for_everyone()
    tracker.finish()   # every rank: Accelerate's end_training tears down the process group: no collective after it
    return metrics


def flush_stats(pending: list, history: dict, step: int, cfg: GANConfig) -> None:
    """Move the pending per-iteration stats to ``history``; a NaN loss stops the run."""
    if not pending:
        return
    rows = torch.stack(pending).float().cpu().tolist()
    pending.clear()
    for row in rows:
        if not all(math.isfinite(v) for v in row[:2]):
            raise UsageError(f"the D or G loss became NaN/inf by iteration {step}; lower --lr "
                             "(checkpoints already written are kept)")
        for key, value in zip(("loss_d", "loss_g", "d_x", "d_g_z"), row):
            history[key].append(value)


def finish_run(cfg, run_dir, history, iters, stages, step, finished, sampler, device, tracker,
               shards: Shards) -> dict:
    """Final metrics and walks (every rank takes its share), then, on rank 0 alone, the final
    grid and the figures."""
    out = {}
    gen = sampler()
    if finished and cfg.eval_metrics:   # final metrics (more samples than a stage) and the walks
        out["final"] = gan_eval.end_of_training(gen, run_dir, tracker, step=step, shards=shards,
                                                n=cfg.eval_samples)
    if not shards.is_main:
        return out
    with torch.no_grad():
        final = save_grid(gen(fixed_noise(cfg).to(device)), run_dir / "samples" / "final.png")
    figures = {"samples/final": final,
               "figures/losses": plot_losses(history, iters, run_dir / "figures" / "losses.png")}
    done = [(f"epoch {e}", stage_path(run_dir, e)) for e in stages if stage_path(run_dir, e).exists()]
    if done:
        figures["figures/stages"] = plot_stages(done, run_dir / "figures" / "stages.png",
                                                "the fixed-noise grid across training")
        middle = done[len(done) // 2] if len(done) > 2 else done[-1]
        panels = [("start: " + done[0][0], done[0][1]), ("middle: " + middle[0], middle[1]),
                  (f"end: iteration {step}", final)]
        figures["figures/three_panel"] = plot_stages(panels, run_dir / "figures" / "three_panel.png",
                                                     "start, middle and end of training")
    tracker.log_images(figures, step=step, caption=f"iteration {step} (epoch {step / iters:g})")
    return out


# --- the sample subcommand and the dispatcher -------------------------------------------------------

@dataclass
class SampleConfig:
    checkpoint: str = arg("", "a run folder, its checkpoints/ folder or one checkpoints/step_* folder", "sample")
    n: int = arg(64, "number of images (--num-images under torchrun or accelerate launch, whose own "
                 "parsers take --n for theirs)", "sample", aliases=("--num-images",))
    out: str = arg("samples.png", "output: .pt (an N x 1 x 28 x 28 tensor in [-1, 1]) or .png (a grid)", "sample")
    seed: int = arg(0, "seed of the z draws", "sample")

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("sample: --checkpoint is required (a run folder or a checkpoints/step_* folder)")
        require_at_least(self.n, 1, "n")
        if Path(self.out).suffix not in (".pt", ".png"):
            raise UsageError(f"sample: --out must end in .pt or .png, got {self.out!r}")


def sample_main(argv: Sequence[str]) -> Path:
    """With several processes each rank generates its share and rank 0 writes the whole set."""
    parser = make_parser(SampleConfig, "Write N generated images as a .pt tensor or a .png grid.",
                         prog="trainers/gan.py sample")
    cfg = SampleConfig(**vars(parser.parse_args(argv)))
    cfg.validate()
    out = Path(cfg.out)
    require_writable_file(out, "--out")
    generator, _ = load_generator(cfg.checkpoint)
    accelerator, shards = gan_eval.job_processes(out.parent)
    with collective_failures(shards.world, DIST_TIMEOUT_S, None):
        part = shards.part(cfg.n)
        images = shards.gather(generate(generator, cfg.n, cfg.seed, part=part), cfg.n)   # (n, 1, 28, 28)
    if accelerator is not None:
        accelerator.end_training()
    if not shards.is_main:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        torch.save(images, tmp)
        os.replace(tmp, out)
    else:
        save_grid(images, out, nrow=math.ceil(math.sqrt(cfg.n)))
    print(f"wrote {cfg.n} images to {out}")
    return out


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "train"
    if command == "sample":
        return sample_main(argv)
    if command in ("evaluate", "interpolate"):
        return getattr(gan_eval, f"{command}_main")(list(argv))
    cfg = parse_train_args(argv)
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cfg.name}: {metrics['steps']} iterations ({metrics['epochs_done']:.2f} epochs) in "
              f"{metrics['wall_time_s']:.0f}s, {metrics['train_images_per_s']:.0f} images/s -> {cfg.run_dir}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
