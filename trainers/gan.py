"""Train the DCGAN on MNIST under HF Accelerate; sample, evaluate and interpolate any checkpoint.

    accelerate launch trainers/gan.py                          # preset auto: paper on CUDA, cpu-demo otherwise
    accelerate launch trainers/gan.py --preset paper --mixed-precision bf16
    accelerate launch --config_file launch/cpu_2proc.yaml trainers/gan.py --preset cpu-demo
    python trainers/gan.py --config my_gan.yaml                # a preset of your own (flag names as keys)
    python trainers/gan.py --resume --run-name <run>           # continue from the last checkpoint
    python trainers/gan.py sample --checkpoint runs/<run> --n 64 --out grid.png   # or --out images.pt
    python trainers/gan.py evaluate --checkpoint runs/<run>    # FID, classifier score, class histogram
    python trainers/gan.py interpolate --checkpoint runs/<run> --mode both --out runs/<run>/interp
    python trainers/gan.py export --checkpoint runs/<run>      # runs/<run>/model: safetensors, ONNX, .pt2, card

Writes <out-dir>/<run-name>/{samples/epoch_XXX.png, samples/final.png, figures/{stages,three_panel,
losses}.png, metrics.json, checkpoints/step_*/}. --batch-size is per process: with N processes the
global batch is N x batch-size, and each rank reads its own shard of every epoch's permutation.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from data.mnist import load_mnist, to_unit_range
from models.dcgan import ALL_REDUCE_STATS, LATENT_DIM, Discriminator, Generator, synchronise_batchnorm
from trainers import debug
from trainers.checkpoint import (elastic_batch, full_disk_is_one_line, load_checkpoint, read_meta, restart_note,
                                 resume_point, save_checkpoint)
from trainers.cli import (Log, Run, UsageError, build, check_choices, flag_value, flatten, from_saved, override, parse,
                          read_config_file, require_at_least, require_non_negative, require_positive, run_cli)
from trainers.files import write_json_atomic
from trainers.gan_metrics import FULL_SAMPLES, STAGE_SAMPLES, images_scored, stage_metrics
from trainers.gan_plots import plot_run
from trainers.gan_sampling import (BN_CALIBRATION, calibrate_batchnorm, load_generator_state, noise,
                                   save_grid)
from trainers.runtime import (Shards, StopFlag, collective_failures, generator_for, hold_run_dir,
                              launched_processes, make_accelerator)
from trainers.tracking import start_tracker

PRESETS = {"paper": "the report's configuration", "cpu-demo": "minutes on a CPU"}   # trainers/configs/<name>.yaml
PRESET_DIR = Path(__file__).resolve().parent / "configs"
SUBCOMMANDS = ("train", "sample", "evaluate", "interpolate", "export")
GRID_SIDE = 8            # fixed-noise grids are 8 x 8
DATA_STREAM = 1_001      # seed keys: every random stream is a pure function of (seed, key, ...)
NOISE_STREAM = 1_002
FIXED_STREAM = 1_003
STOP_CHECK_EVERY = 10    # iterations between checks of a SIGTERM/SIGINT (an all-reduce and a host sync)
SUMMARY_KEYS = ("steps", "epochs_done", "finished", "wall_time_s", "train_images_per_s", "eval_time_s",
                "skipped_steps_d", "skipped_steps_g")   # metrics.json numbers the run's summary repeats
RESUME_MUST_MATCH = ("base_channels", "latent_dim", "train_subset", "seed", "ema_decay")   # the global batch too


# --- config: the defaults are the report's configuration (the paper preset) ---------------------

@dataclass
class Data:
    """data"""
    data_dir: str = ""  # folder holding MNIST/raw/*.gz (default: the repo's data/)
    train_subset: int = 0  # train on the first N training images only (0: all of them)


@dataclass
class Model:
    """model"""
    base_channels: int = 128  # width b of G and D (the report's 128)
    latent_dim: int = LATENT_DIM  # size of z
    batchnorm: Literal["global", "local"] = "global"  # with several processes, BatchNorm statistics over the global batch, or each rank's own (docs/scaling.md)


@dataclass
class Optim:
    """optimisation"""
    epochs: int = 50  # passes over the training set (the report: 50, up to 200)
    max_steps: int = 0  # stop after this many iterations (0: run every epoch); for tests
    batch_size: int = 128  # images per iteration, per process
    lr: float = 2e-4  # Adam learning rate of G (and of D unless --lr-d is given)
    lr_d: float = 0.0  # Adam learning rate of D (0: the same as --lr)
    beta1: float = 0.5  # Adam beta1 (DCGAN's 0.5)
    beta2: float = 0.999  # Adam beta2
    ema_decay: float = 0.0  # decay of an EMA of G's weights used for samples (0: off)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast precision (fp16 needs CUDA)
    channels_last: bool = False  # NHWC memory format for G and D
    num_threads: int = 0  # torch CPU threads per process (0: torch's default)


@dataclass
class Eval:
    """evaluation"""
    stages: str = "0,1,5,10,20,30,40,50"  # epochs after which the fixed-noise grid is saved (0: before any step)
    log_every: int = 50  # iterations between train/* scalars
    eval_metrics: bool = True  # at each stage and at the end: FID, classifier score, class histogram, latent walks
    stage_samples: int = STAGE_SAMPLES  # images scored at each stage
    eval_samples: int = FULL_SAMPLES  # images scored at the end (the real floor uses 10,000)


@dataclass
class GANConfig:
    """Train the DCGAN on MNIST. Subcommands: sample, evaluate, interpolate, export (train is the default)."""
    preset: Literal["auto", "paper", "cpu-demo"] = "auto"  # paper, cpu-demo, or auto: paper on CUDA, cpu-demo otherwise
    config: str = ""  # a YAML or JSON file of flag values (as trainers/configs/*.yaml), read after the preset
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    eval: Eval = field(default_factory=Eval)
    log: Log = field(default_factory=Log)
    run: Run = field(default_factory=Run)

    def validate(self) -> None:
        check_choices(self)
        self.run.validate()
        o, flat = self.optim, flatten(self)
        require_positive(o.lr, "lr")
        require_non_negative(o.lr_d, "lr_d")
        for name in ("beta1", "beta2", "ema_decay"):
            require_non_negative(flat[name], name)
            if flat[name] >= 1:
                raise UsageError(f"--{name.replace('_', '-')} must be below 1, got {flat[name]!r}")
        for name in ("epochs", "batch_size", "base_channels", "latent_dim", "log_every"):
            require_at_least(flat[name], 1, name)
        for name in ("max_steps", "train_subset", "num_threads"):
            require_at_least(flat[name], 0, name)
        for name in ("stage_samples", "eval_samples"):
            require_at_least(flat[name], 2, name)
        self.stage_list()

    def stage_list(self) -> list[int]:
        """The stages as sorted epochs in [0, epochs]; UsageError for anything else."""
        try:
            stages = sorted({int(s) for s in self.eval.stages.split(",") if s.strip()})
        except ValueError:
            raise UsageError(f"--stages must be comma-separated epochs like 0,1,5, got {self.eval.stages!r}") from None
        if not stages or stages[0] < 0:
            raise UsageError(f"--stages must list epochs >= 0, got {self.eval.stages!r}")
        return [s for s in stages if s <= self.optim.epochs]

    @property
    def name(self) -> str:
        return self.run.run_name or f"gan-{self.preset}-b{self.model.base_channels}-s{self.run.seed}"

    @property
    def run_dir(self) -> Path:
        return self.run.folder(self.name)


def resolve_preset(preset: str) -> str:
    if preset == "auto":
        return "paper" if torch.cuda.is_available() else "cpu-demo"
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of auto, {', '.join(PRESETS)}, got {preset!r}")
    return preset


def make_config(preset: str = "auto", **overrides) -> GANConfig:
    """The config of ``preset`` (its file under trainers/configs/) with flat ``overrides`` on top, validated."""
    resolved = resolve_preset(preset)
    cfg = build(GANConfig, **read_config_file(PRESET_DIR / f"{resolved}.yaml", GANConfig), preset=resolved)
    cfg = override(cfg, **overrides)
    cfg.validate()
    return cfg


def parse_train_args(argv: Sequence[str]) -> GANConfig:
    """CLI -> config: the preset's file, then --config's, then every flag given."""
    preset = flag_value("--preset", argv) or "auto"
    default = override(make_config(preset), preset=preset) if preset in ("auto", *PRESETS) else GANConfig()
    cfg = parse(GANConfig, argv, prog="trainers/gan.py", description=GANConfig.__doc__, default=default)
    cfg = override(cfg, preset=resolve_preset(cfg.preset))
    if preset == "auto" and int(os.environ.get("RANK", "0")) == 0:
        why = "a CUDA device is present" if cfg.preset == "paper" else "no CUDA device"
        print(f"preset auto -> {cfg.preset} ({why}); pass --preset to choose", flush=True)
    return cfg


# --- data ------------------------------------------------------------------------------------

def load_train_images(cfg: GANConfig) -> torch.Tensor:
    """The md5-checked MNIST training images in [-1, 1], ``(N, 1, 28, 28)``."""
    images, _ = load_mnist("train", cfg.data.data_dir or None)
    return to_unit_range(images[: cfg.data.train_subset] if cfg.data.train_subset else images)


def iterations_per_epoch(n_images: int, batch_size: int, world: int) -> int:
    return (n_images // world) // batch_size


def epoch_batches(cfg: GANConfig, n_images: int, rank: int, world: int, epoch: int) -> torch.Tensor:
    """``(iterations, batch)`` image indices of ``rank`` in ``epoch`` (1-based).

    One permutation per epoch, a pure function of (seed, epoch); rank r takes every world-th
    index from r, so the ranks' shards are disjoint and cover the epoch. The last partial batch
    is dropped, so every rank runs the same number of iterations."""
    perm = torch.randperm(n_images, generator=generator_for(cfg.run.seed, DATA_STREAM, epoch))
    iters = iterations_per_epoch(n_images, cfg.optim.batch_size, world)
    return perm[rank::world][: iters * cfg.optim.batch_size].view(iters, cfg.optim.batch_size)


def step_noise(cfg: GANConfig, rank: int, world: int, step: int) -> torch.Tensor:
    """``(batch, latent)`` z of ``rank`` at ``step``: its rows of the global batch's z, a pure function
    of (seed, step), so N processes draw exactly the z one process with N x the batch draws."""
    B = cfg.optim.batch_size
    z = noise(B * world, cfg.model.latent_dim, cfg.run.seed, NOISE_STREAM, 0, step)   # (world B, latent)
    return z[rank * B:(rank + 1) * B]


def fixed_noise(cfg: GANConfig) -> torch.Tensor:
    """The z of every stage grid, the same for the whole run."""
    return noise(GRID_SIDE * GRID_SIDE, cfg.model.latent_dim, cfg.run.seed, FIXED_STREAM)


# --- models ----------------------------------------------------------------------------------

def build_models(cfg: GANConfig) -> tuple[Generator, Discriminator]:
    torch.manual_seed(cfg.run.seed)
    return Generator(cfg.model.latent_dim, cfg.model.base_channels), Discriminator(cfg.model.base_channels)


def ema_of(generator: torch.nn.Module) -> AveragedModel:
    """A copy of G to average its weights into (``ema_step``), checkpointed with the run. Its
    BatchNorm statistics are re-estimated before it samples (averaged weights do not match the
    live generator's running statistics)."""
    return AveragedModel(generator).eval().requires_grad_(False)


@torch.no_grad()
def ema_step(ema: AveragedModel, generator: torch.nn.Module, decay: float, t: int) -> None:
    """The t-th update (t = 1, 2, ...: the iteration) of the EMA, with warm-up:
    ema <- ema + (1 - decay_t) (G - ema), decay_t = min(decay, (1+t)/(10+t)).
    t comes from the loop, not from a device counter, so the step needs no host sync."""
    weight = 1 - min(decay, (1 + t) / (10 + t))
    for averaged, current in zip(ema.module.parameters(), generator.parameters()):
        averaged.lerp_(current.to(averaged.dtype), weight)


def load_generator(checkpoint_path: str | Path) -> tuple[Generator, GANConfig]:
    """The generator whose samples the run reports (the EMA one if the run kept one), in eval
    mode on the CPU, and the run's config. ``checkpoint_path``: a run, checkpoints/ or step folder."""
    generator, config = load_generator_state(checkpoint_path)
    return generator, from_saved(GANConfig, config)


# --- the loop --------------------------------------------------------------------------------

@dataclass
class Clock:
    """Where the run is, what it has seen, and where its time went (saved in every checkpoint)."""
    history: dict = field(default_factory=lambda: {"loss_d": [], "loss_g": [], "d_x": [], "d_g_z": []})
    stages: dict = field(default_factory=dict)   # epoch -> its metrics
    skipped_d: int = 0   # fp16: steps the scaler skipped for inf/NaN gradients
    skipped_g: int = 0
    wall_before: float = 0.0   # seconds before this launch (resumed runs)
    aside_s: float = 0.0       # seconds on stages and checkpoints, left out of the training speed
    eval_s: float = 0.0        # seconds on stages and the final evaluation
    t0: float = field(default_factory=time.perf_counter)

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


def train(cfg: GANConfig, on_stage: Callable[[int, dict, Path], str | None] | None = None,
          stop_reason: str | None = None) -> dict:
    """Train under an Accelerator (``accelerate launch`` decides devices and processes); return
    the final metrics, also written to ``<run>/metrics.json``. A collective that fails or times
    out (a dead or stuck rank) ends the job with a one-line JobFailure; checkpoints are kept.
    ``on_stage(step, numbers, ckpt)`` is called on one process after each stage past epoch 0 and
    its checkpoint (Ray Tune reports through it); a string it returns ends the run there,
    recorded as ``stop_reason`` (else: completed or interrupted). A run resumed with ``stop_reason``
    trains no further: it writes its record, ended for that reason, from its checkpoint."""
    cfg.validate()
    with hold_run_dir(cfg.run_dir, cfg.run.resume):   # one writer per run folder
        resume_from = resume_point(cfg.run_dir / "checkpoints", cfg.run.resume)
        meta = read_meta(resume_from) if resume_from is not None else {}
        saved, world = meta.get("config", {}), launched_processes()
        for name in RESUME_MUST_MATCH:
            if name in saved and saved[name] != flatten(cfg)[name]:
                raise UsageError(f"--resume: the checkpoint was trained with --{name.replace('_', '-')} "
                                 f"{saved[name]}, not {flatten(cfg)[name]}; pass the same value")
        note = None
        if resume_from is not None:   # on another number of processes: the same global batch
            batch, note = elastic_batch(resume_from, meta, cfg.optim.batch_size, world)
            cfg = override(cfg, batch_size=batch)
        images = load_train_images(cfg)
        if note:   # the same global batch gives the same epoch length, or the step no longer names the epoch
            before = iterations_per_epoch(len(images), saved["batch_size"], int(meta.get("processes") or 1))
            if iterations_per_epoch(len(images), batch, world) != before:
                raise UsageError(f"--resume: on {world} processes an epoch of {len(images)} images has "
                                 f"{iterations_per_epoch(len(images), batch, world)} iterations, not the "
                                 f"checkpoint's {before}; resume on {meta.get('processes') or 1} processes")
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{cfg.name}: {note}{restart_note()}", flush=True)
        if cfg.optim.num_threads:
            torch.set_num_threads(cfg.optim.num_threads)
        with full_disk_is_one_line(cfg.run_dir / "checkpoints"), \
                collective_failures(world, cfg.run.dist_timeout, cfg.run_dir / "checkpoints"):
            return _train(cfg, images, resume_from, on_stage, stop_reason)


def _train(cfg: GANConfig, images: torch.Tensor, resume_from: Path | None, on_stage=None, stop_reason=None) -> dict:
    from accelerate.utils import DistributedDataParallelKwargs
    run_dir, ckpt_dir, o = cfg.run_dir, cfg.run_dir / "checkpoints", cfg.optim
    # Synchronised BatchNorm keeps every rank's BatchNorm buffers equal, so DDP need not
    # broadcast them (broadcasting in place between D's real and fake passes breaks autograd).
    accelerator = make_accelerator(o.mixed_precision, cfg.log.wandb, run_dir,
                                   [DistributedDataParallelKwargs(broadcast_buffers=False)], cfg.run.dist_timeout)
    rank, world, device, config = accelerator.process_index, accelerator.num_processes, accelerator.device, flatten(cfg)
    config["mixed_precision"] = accelerator.mixed_precision   # what ran: the flag, or accelerate launch's
    shards = Shards(accelerator)   # how the ranks share the evaluation
    iters = iterations_per_epoch(len(images), o.batch_size, world)
    if iters < 1:
        raise UsageError(f"--batch-size {o.batch_size} x {world} processes exceeds the {len(images)} "
                         "training images; lower --batch-size or raise --train-subset")
    total = o.epochs * iters if not o.max_steps else min(o.max_steps, o.epochs * iters)

    G, D = build_models(cfg)
    ema = ema_of(G) if o.ema_decay > 0 else None
    global_bn = world > 1 and cfg.model.batchnorm == "global"
    if global_bn:  # batch statistics over the global batch, identical buffers on every rank
        G, D = synchronise_batchnorm(G, device.type), synchronise_batchnorm(D, device.type)
    if o.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    # fused: one kernel for all of a model's parameters instead of Adam's per-parameter loop; the same
    # update to rounding (benchmarks/gan_speed.py measures the loop against the example's default Adam).
    opt_g = torch.optim.Adam(G.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d or o.lr, betas=(o.beta1, o.beta2), fused=True)
    G, D, opt_g, opt_d = accelerator.prepare(G, D, opt_g, opt_d)
    # Under mixed precision `prepare` wraps each module's forward in autocast plus a cast of its
    # outputs to fp32; one `accelerator.autocast()` per step instead (as a plain loop) saves ~2%.
    for model in (G, D):
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    G_plain, D_plain = accelerator.unwrap_model(G), accelerator.unwrap_model(D)
    images = images.to(device)   # MNIST (188 MB as fp32) fits on any GPU: no host copy per batch

    start, clock, resumed = 0, Clock(), {}
    if resume_from is not None:
        meta = load_checkpoint(accelerator, resume_from)
        resumed = {"resumed_from_processes": meta.get("processes", 1),   # for debug.json: the weights as loaded
                   "loaded": debug.fingerprint(*G_plain.state_dict().values(), *D_plain.state_dict().values())
                   if debug.enabled() else 0}
        start, extra = meta["step"], meta["extra"]
        clock = Clock(history=extra["history"], wall_before=extra["wall_time"], **extra["record"])
        for opt, lr in ((opt_g, o.lr), (opt_d, o.lr_d or o.lr)):   # this job's flags win over the state's copy
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (o.beta1, o.beta2)
        accelerator.print(f"resuming {run_dir.name} from iteration {start} ({resume_from.name}){restart_note()}")

    tracker = start_tracker(accelerator, cfg.log.wandb_project, cfg.name, config, run_dir, cfg.log.wandb_group or None,
                            job_type=cfg.log.wandb_job_type, tags=[cfg.preset, f"b{cfg.model.base_channels}"],
                            resumed_from=start)   # one wandb run across restarts (its id kept in the run folder)
    stop, z_fixed, stages = StopFlag(), fixed_noise(cfg), cfg.stage_list()

    def sampler() -> torch.nn.Module:
        """The generator whose samples we show: the EMA one (BatchNorm re-estimated) or G."""
        return calibrate_batchnorm(ema.module, cfg.run.seed, *BN_CALIBRATION) if ema is not None else G_plain.eval()

    def equal_buffers() -> None:
        """--batchnorm local: each rank's running statistics follow its own batches; before G and D
        sample or are saved, every rank takes their mean over the ranks (a collective)."""
        if world > 1 and not global_bn:
            average_running_stats(accelerator, G_plain, D_plain)

    def stage(epoch: int, step: int) -> None:
        """Grid and metrics of one stage. Every rank scores its share of the samples (collectives,
        same order on every rank); rank 0 alone writes the grid and logs."""
        tick = time.perf_counter()
        equal_buffers()
        gen = sampler()   # equal weights on every rank, so equal samples
        numbers = stage_metrics(gen, device, shards, cfg.eval.stage_samples) if cfg.eval.eval_metrics else {}
        if accelerator.is_main_process:
            with torch.no_grad():
                png = save_grid(gen(z_fixed.to(device)), run_dir / "samples" / f"epoch_{epoch:03d}.png")
            clock.stages[str(epoch)] = {"step": step, **numbers}
            tracker.log(numbers | {"stage/epoch": epoch}, step=step)
            tracker.log_images({"samples/grid": png}, step=step, caption=f"epoch {epoch}, iteration {step}")
        G_plain.train()
        accelerator.wait_for_everyone()
        clock.aside_s += time.perf_counter() - tick
        clock.eval_s += time.perf_counter() - tick

    def checkpoint(at: int) -> Path:
        tick = time.perf_counter()
        equal_buffers()
        record = {"stages": clock.stages, "skipped_d": clock.skipped_d, "skipped_g": clock.skipped_g}
        path = save_checkpoint(accelerator, ckpt_dir, at, config, cfg.run.keep_checkpoints,
                               extra={"history": clock.history, "wall_time": clock.wall(), "record": record})
        clock.aside_s += time.perf_counter() - tick
        return path

    if start == 0 and 0 in stages:
        stage(0, 0)
    bar = tqdm(total=total, initial=start, desc=cfg.name, dynamic_ncols=True,
               disable=not (cfg.run.progress and accelerator.is_local_main_process))
    ones, zeros = torch.ones(o.batch_size, device=device), torch.zeros(o.batch_size, device=device)
    pending: list[torch.Tensor] = []   # per-iteration stats kept on the device until the next log
    step, batches, batches_epoch, reason = start, None, -1, stop_reason   # reason: why the run ends early
    loop_start, clock.aside_s = time.perf_counter(), 0.0
    ALL_REDUCE_STATS.update(seconds=0.0, calls=0)
    G.train()
    D.train()
    for step in range(start + 1, (start if reason else total) + 1):
        epoch, it = (step - 1) // iters + 1, (step - 1) % iters
        if batches_epoch != epoch:
            batches, batches_epoch = epoch_batches(cfg, len(images), rank, world, epoch).to(device), epoch
            # the z of the epoch's remaining steps in one host-to-device copy, not one per step
            zs_from, upto = step, min(epoch * iters, total)
            zs = torch.stack([step_noise(cfg, rank, world, s) for s in range(zs_from, upto + 1)]).to(device)
        real = images[batches[it]]                                 # (B, 1, 28, 28)
        z = zs[step - zs_from]                                     # (B, latent)
        if o.channels_last:
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
        # (2) G step, non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z))).
        # D is frozen: its weight gradients would be thrown away by the next D step (and, under
        # DDP, all-reduced first), so the pass runs through the unwrapped D, outside DDP's hooks.
        D_plain.requires_grad_(False)
        with accelerator.autocast():
            logit_gen = D_plain(fake).float()                      # (B,)
        loss_g = F.binary_cross_entropy_with_logits(logit_gen, ones)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        opt_g.step()
        D_plain.requires_grad_(True)
        if ema is not None:
            ema_step(ema, G_plain, o.ema_decay, step)
        clock.skipped_d += int(opt_d.step_was_skipped)
        clock.skipped_g += int(opt_g.step_was_skipped)
        pending.append(torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(logit_real).mean().detach(),
                                    torch.sigmoid(logit_fake).mean().detach()]))
        bar.update(1)

        end_of_epoch = it == iters - 1
        if step % cfg.eval.log_every == 0 or step == total or end_of_epoch:
            flush_stats(pending, clock.history, step)
            last = {k: v[-1] for k, v in clock.history.items()}
            tracker.log({f"train/{k}": v for k, v in last.items()} |
                        {"train/epoch": step / iters, "train/skipped_d": clock.skipped_d,
                         "train/skipped_g": clock.skipped_g}, step=step)
            bar.set_postfix(d=f"{last['loss_d']:.2f}", g=f"{last['loss_g']:.2f}", epoch=epoch)
        staged = end_of_epoch and epoch in stages
        if staged:
            stage(epoch, step)
        stopping = step % STOP_CHECK_EVERY == 0 and stop.should_stop(accelerator)   # a collective, and a host sync
        if step % cfg.run.checkpoint_every == 0 or end_of_epoch or step == total or stopping:
            flush_stats(pending, clock.history, step)
            ckpt = checkpoint(step)
        if staged and on_stage is not None:
            reason = on_stage(step, {**clock.stages[str(epoch)], "epoch": epoch, "wall_s": clock.wall()}, ckpt)
        if stopping:
            accelerator.print(f"stop requested: checkpoint at iteration {step} written; rerun with --resume")
            break
        if reason:
            break
    train_time = time.perf_counter() - loop_start - clock.aside_s
    bar.close()
    stop.restore()

    # --- evaluate and save: final metrics and walks (every rank its share), grids and figures -------
    finished, history, wall_time = step == total, clock.history, clock.wall()
    tick = time.perf_counter()
    equal_buffers()
    gen = sampler()
    metrics = {"steps": step, "epochs_done": step / iters, "iterations_per_epoch": iters, "finished": finished,
               "processes": world, **({"resumed_from_processes": resumed["resumed_from_processes"]} if resumed else {}),
               "preset": cfg.preset, "stages": clock.stages, "config": config,
               "stop_reason": reason or ("completed" if finished else "interrupted"),
               "train_images_per_s": round((step - start) * o.batch_size * world / max(train_time, 1e-9), 1),
               "skipped_steps_d": clock.skipped_d, "skipped_steps_g": clock.skipped_g}
    tail = max(1, min(iters, len(history["loss_d"])))   # the last epoch's means
    metrics.update({f"last_epoch/{k}": sum(v[-tail:]) / tail for k, v in history.items() if v})
    if finished and cfg.eval.eval_metrics:
        from trainers.gan_evaluate import end_of_training
        metrics["final"] = end_of_training(gen, run_dir, tracker, step=step, shards=shards, n=cfg.eval.eval_samples)
    if accelerator.is_main_process:
        with torch.no_grad():
            final = save_grid(gen(z_fixed.to(device)), run_dir / "samples" / "final.png")
        figures = {"samples/final": final, **plot_run(run_dir, history, iters, stages, final, step)}
        tracker.log_images(figures, step=step, caption=f"iteration {step} (epoch {step / iters:g})")
    clock.eval_s += time.perf_counter() - tick
    metrics.update({"eval_time_s": round(clock.eval_s, 2), "wall_time_s": round(wall_time, 2)})
    debug.record(accelerator, run_dir, images_scored=images_scored(),   # collectives: every rank
                 weights=debug.fingerprint(*G_plain.state_dict().values(), *D_plain.state_dict().values()),
                 first_batch=debug.fingerprint(epoch_batches(cfg, len(images), rank, world, 1)[0]),
                 bn_allreduce_calls=ALL_REDUCE_STATS["calls"], bn_allreduce_ms=int(1000 * ALL_REDUCE_STATS["seconds"]),
                 train_ms=int(1000 * train_time), loaded_weights=resumed.get("loaded", 0))
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "metrics.json", metrics)
    if finished:   # the exported generator as a wandb model artifact (rank 0 with wandb; else nothing)
        from trainers.gan_export import artifact_metadata, export_generator
        tracker.log_model(lambda folder: export_generator(gen, config, metrics, step, folder),
                          metadata=artifact_metadata(metrics))
    tracker.summary({k: metrics[k] for k in SUMMARY_KEYS})   # end-of-run numbers (final/* come from the evaluation)
    accelerator.wait_for_everyone()
    tracker.finish()   # every rank: Accelerate's end_training tears down the process group: no collective after it
    return metrics


def average_running_stats(accelerator, *models: torch.nn.Module) -> None:
    """Replace every BatchNorm running mean and variance of ``models`` by its mean over the ranks,
    in place: one all-reduce, every rank calls it at the same point."""
    buffers = [b for m in models for name, b in m.named_buffers() if name.endswith(("running_mean", "running_var"))]
    mean = accelerator.reduce(torch.cat([b.flatten() for b in buffers]), reduction="mean")
    for b, value in zip(buffers, mean.split([b.numel() for b in buffers])):
        b.copy_(value.view_as(b))


def flush_stats(pending: list, history: dict, step: int) -> None:
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


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "train"
    if command == "sample":
        from trainers.gan_sample import sample_main
        return sample_main(argv)
    if command == "evaluate":
        from trainers.gan_evaluate import evaluate_main
        return evaluate_main(argv)
    if command == "interpolate":
        from trainers.gan_interpolate import interpolate_main
        return interpolate_main(argv)
    if command == "export":
        from trainers.gan_export import export_main
        return export_main(argv)
    cfg = parse_train_args(argv)
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cfg.name}: {metrics['steps']} iterations ({metrics['epochs_done']:.2f} epochs) in "
              f"{metrics['wall_time_s']:.0f}s, {metrics['train_images_per_s']:.0f} images/s -> {cfg.run_dir}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
