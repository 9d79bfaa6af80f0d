"""Score a generator, or a file of images, with the shipped classifier, beside real MNIST.

    python trainers/gan.py evaluate --checkpoint runs/<run>            # 10,000 samples vs the floor
    python trainers/gan.py evaluate --images samples.pt                # an N x 1 x 28 x 28 tensor in [-1, 1]
    python trainers/gan.py evaluate --checkpoint runs/<run> --wandb    # also a wandb run: summary and bar chart

Writes ``metrics.json`` and ``class_histogram.png`` under ``--out`` and prints the table. The
trainer calls ``end_of_training`` once at the end of a run: the same numbers for its generator,
the latent walks' figures, and their logging.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Sequence

import torch
import tyro
from torch import Tensor, nn

from models.mnist_cnn import NUM_CLASSES
from trainers import gan_walks
from trainers.cli import DIST_TIMEOUT_S, UsageError, parse, require_at_least, require_writable_dir
from trainers.files import write_json_atomic
from trainers.gan_metrics import (FULL_SAMPLES, fid_over_floor, format_report, full_metrics, plot_class_histogram,
                                  score_generator, scorer_for)
from trainers.gan_sampling import checkpoint_generator, command_device, job_processes, run_tags, unwrap
from trainers.runtime import SINGLE, Shards, collective_failures
from trainers.tracking import NullTracker, start_tracker


@dataclass
class EvaluateConfig:
    checkpoint: str = ""  # run folder or checkpoint to sample from (or use --images)
    images: str = ""  # .pt file holding an N x 1 x 28 x 28 float tensor in [-1, 1] (or use --checkpoint)
    n: Annotated[int, tyro.conf.arg(aliases=("--num-images",))] = FULL_SAMPLES  # images sampled from --checkpoint (the floor uses 10,000); --num-images under torchrun or accelerate launch, whose own parsers take --n for theirs
    seed: int = 0  # seed of the sampled latents
    out: str = ""  # folder for metrics.json and class_histogram.png; empty: <run>/eval, or <images stem>_eval beside the file
    wandb: bool = False  # also log the numbers (run summary), the class-histogram bar chart and the figure to wandb (offline without an API key)
    wandb_project: str = "palgan"  # wandb project

    def validate(self) -> None:
        if bool(self.checkpoint) == bool(self.images):
            raise UsageError("pass exactly one of --checkpoint DIR or --images FILE.pt")
        require_at_least(self.n, 2, "n")


# --- what metrics.json and the tracker hold ---------------------------------------------------

def flat_metrics(result: dict) -> dict[str, float]:
    """``{name: float}`` for metrics.json and the tracker: each number beside its real-data floor."""
    g, f = result["generated"], result["real_floor"]
    out = {"n": float(g["n"]), "n_floor": float(f["n"])}
    for key in ("fid", "classifier_score", "class_entropy", "min_class_frac", "max_class_frac"):
        out[key], out[f"{key}_floor"] = g[key], f[key]
    out["fid_over_floor"] = fid_over_floor(g, f)
    for d in range(NUM_CLASSES):
        out[f"class_frac_{d}"], out[f"class_frac_{d}_floor"] = g["class_hist"][d], f["class_hist"][d]
    return out


def summary_metrics(final: dict[str, float]) -> dict[str, float]:
    """The run summary's ``final/*`` numbers: ``flat_metrics`` less the per-class fractions, which
    the class-histogram bar chart holds."""
    return {f"final/{k}": v for k, v in final.items() if not k.startswith("class_frac_")}


def log_class_histogram(tracker, generated: dict, floor: dict, step: int | None) -> None:
    """The class histogram as a native bar chart, each digit's generated fraction beside the real floor's."""
    tracker.log_bar("eval/class_histogram", range(NUM_CLASSES),
                    {"generated": generated["class_hist"], "real floor": floor["class_hist"]}, step=step,
                    title=f"class histogram: generated (n={generated['n']}) beside real MNIST (n={floor['n']})")


# --- the trainer's end of run -----------------------------------------------------------------

def end_of_training(generator: nn.Module, run_dir: Path, tracker, step: int | None = None,
                    shards: Shards = SINGLE, n: int | None = None) -> dict:
    """Final metrics (``n``, default 10,000, samples beside the floor) and the latent walks'
    figures under ``run_dir/figures``; images and a table go to ``tracker``. Returns
    ``flat_metrics`` for metrics.json. Every rank calls it; rank 0 alone writes and logs."""
    scorer = scorer_for(next(unwrap(generator).parameters()).device, shards)
    result = full_metrics(generator, scorer, n, shards=shards)
    figures_dir = Path(run_dir) / "figures"
    walks, figures = gan_walks.interpolate(generator, scorer, gan_walks.parse_pairs(gan_walks.DEFAULT_PAIRS),
                                           gan_walks.WALK_STEPS, "both", figures_dir, shards=shards)
    final = flat_metrics(result)
    if not shards.is_main:
        return final
    figures["figures/class_histogram"] = plot_class_histogram(result["generated"], result["real_floor"],
                                                              figures_dir / "class_histogram.png")
    tracker.log_images(figures, step=step)
    tracker.log_table("interp/walks", gan_walks.TABLE_COLUMNS, gan_walks.walk_rows(walks), step=step)
    log_class_histogram(tracker, result["generated"], result["real_floor"], step)
    tracker.summary(summary_metrics(final))
    print(format_report(result["generated"], result["real_floor"]))
    return final


# --- the evaluate command ---------------------------------------------------------------------

def load_images(path: str) -> Tensor:
    """An ``N x 1 x 28 x 28`` finite float tensor in [-1, 1] from a .pt file, else a UsageError."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--images {p} does not exist; write one with `python trainers/gan.py sample "
                         "--checkpoint DIR --n 10000 --out FILE.pt`")
    try:
        images = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, pickled objects
        raise UsageError(f"--images {p} is not a readable tensor file ({err.__class__.__name__})") from None
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28) \
            or len(images) < 2:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UsageError(f"--images {p} holds {shape}; expected a tensor of shape N x 1 x 28 x 28 with N >= 2")
    if not images.is_floating_point() or not torch.isfinite(images).all() or images.abs().max() > 1.0 + 1e-4:
        raise UsageError(f"--images {p} must hold finite float values in [-1, 1] (the generator's tanh range)")
    return images.float()


def evaluate_main(argv: Sequence[str] | None = None) -> dict:
    """Every rank scores its share of the images; rank 0 writes metrics.json and the histogram."""
    cfg = parse(EvaluateConfig, argv, prog="trainers/gan.py evaluate",
                description="Score generated digits with the shipped classifier (FID, classifier score, "
                            "class histogram) beside real MNIST.")
    if cfg.images:
        images = load_images(cfg.images)
        out = Path(cfg.out) if cfg.out else Path(cfg.images).with_name(Path(cfg.images).stem + "_eval")
        source, generator = str(Path(cfg.images).resolve()), None
    else:
        generator, run_dir = checkpoint_generator(cfg.checkpoint)
        out = Path(cfg.out) if cfg.out else run_dir / "eval"
        source = str(Path(cfg.checkpoint).resolve())
    require_writable_dir(out, "--out")
    accelerator, shards = job_processes(out, cfg.wandb)
    device = command_device(accelerator)
    with collective_failures(shards.world, DIST_TIMEOUT_S, None):
        scorer = scorer_for(device, shards)
        if generator is None:
            generated = scorer.score_images(images, shards)
        else:
            generated = score_generator(generator.to(device), scorer, cfg.n, cfg.seed, shards)
        floor = scorer.floor(shards=shards)
    result = {"source": source, "generated": generated, "real_floor": floor,
              "fid_over_floor": fid_over_floor(generated, floor), "config": asdict(cfg), "processes": shards.world}
    if shards.is_main:
        write_json_atomic(out / "metrics.json", result)
        plot_class_histogram(generated, floor, out / "class_histogram.png")
        print(format_report(generated, floor))
        print(f"FID / floor {result['fid_over_floor']:.2f} -> {out}/metrics.json, {out}/class_histogram.png")
    if accelerator is not None:   # every rank: the tracker (a null one off rank 0) ends the process group
        name = Path(source).stem if cfg.images else Path(source).name
        tracker = start_tracker(accelerator, cfg.wandb_project, f"evaluate-{name}", asdict(cfg), out,
                                job_type="evaluate", tags=run_tags(cfg.checkpoint)) if cfg.wandb \
            else NullTracker(accelerator)
        tracker.summary(summary_metrics(flat_metrics(result)))
        log_class_histogram(tracker, generated, floor, step=0)
        tracker.log_images({"figures/class_histogram": out / "class_histogram.png"}, step=0)
        tracker.finish()
    return result
