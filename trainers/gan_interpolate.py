"""Latent walks between digit pairs of a trained generator, linear and SLERP, as figures.

    python trainers/gan.py interpolate --checkpoint runs/<run> --pairs 8-3,1-7,0-6,4-9 --steps 9 --mode both

Writes ``interp_<mode>_<a>-<b>.png`` per walk and, for ``--mode both``, ``interp_linear_vs_slerp.png``
under ``--out``, and prints each walk's labels and confidences (``trainers/gan_walks.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

from trainers.cli import DIST_TIMEOUT_S, UsageError, check_choices, parse, require_at_least, require_writable_dir
from trainers.gan_metrics import scorer_for
from trainers.gan_sampling import checkpoint_generator, command_device, job_processes, run_tags
from trainers.gan_walks import (DEFAULT_PAIRS, ENDPOINT_DRAWS, TABLE_COLUMNS, Walk, interpolate, parse_pairs,
                                print_walks, walk_rows)
from trainers.runtime import collective_failures
from trainers.tracking import start_tracker


@dataclass
class InterpolateConfig:
    checkpoint: str = ""  # run folder or checkpoint of the generator (required)
    pairs: str = DEFAULT_PAIRS  # digit pairs to walk between, as a-b,c-d
    steps: int = 9  # frames per walk, t = 0, 1/(steps-1), ..., 1
    mode: Literal["linear", "slerp", "both"] = "both"  # latent path: straight line, great circle, or both
    draws: int = ENDPOINT_DRAWS  # latents searched for each endpoint digit
    seed: int = 0  # seed of the searched latents
    out: str = ""  # folder for the figures; empty: <run>/eval
    wandb: bool = False  # also log the figures and a table to wandb (offline without an API key)
    wandb_project: str = "palgan"  # wandb project

    def validate(self) -> None:
        check_choices(self)
        if not self.checkpoint:
            raise UsageError("--checkpoint DIR is required (a run folder or one of its checkpoints/step_* folders)")
        parse_pairs(self.pairs)
        require_at_least(self.steps, 2, "steps")
        require_at_least(self.draws, 1, "draws")


def interpolate_main(argv: Sequence[str] | None = None) -> list[Walk]:
    """Every rank searches its share of the endpoint draws; rank 0 walks, draws and logs."""
    cfg = parse(InterpolateConfig, argv, prog="trainers/gan.py interpolate",
                description="Latent walks between digit pairs, linear and SLERP, labelled by the shipped classifier.")
    generator, run_dir = checkpoint_generator(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else run_dir / "eval"
    require_writable_dir(out, "--out")
    accelerator, shards = job_processes(out, cfg.wandb)
    device = command_device(accelerator)
    with collective_failures(shards.world, DIST_TIMEOUT_S, None):
        walks, figures = interpolate(generator.to(device), scorer_for(device, shards), parse_pairs(cfg.pairs),
                                     cfg.steps, cfg.mode, out, cfg.draws, cfg.seed, shards)
    if accelerator is not None:
        if cfg.wandb:   # every rank: the tracker (a null one off rank 0) ends the process group
            tracker = start_tracker(accelerator, cfg.wandb_project, f"interpolate-{run_dir.name}", asdict(cfg), out,
                                    job_type="interpolate", tags=run_tags(cfg.checkpoint))
            tracker.log_images(figures, step=0)
            tracker.log_table("interp/walks", TABLE_COLUMNS, walk_rows(walks), step=0)
            tracker.finish()
        else:
            accelerator.end_training()
    if walks:   # rank 0 (the others hold no walks)
        print_walks(walks)
        print("wrote " + ", ".join(str(p) for p in figures.values()))
    return walks
