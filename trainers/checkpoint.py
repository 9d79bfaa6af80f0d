"""Atomic checkpoints: ``accelerator.save_state`` plus the step and the config.

Layout: ``<run>/checkpoints/step_00001000/`` holding Accelerate's files (models, optimisers,
scaler, RNG of every rank) and ``palgan.json`` (step, config, extra state). A checkpoint is
written to a ``.tmp-*`` folder and renamed into place only once it is complete, so a
crash mid-write never leaves a half checkpoint where ``--resume`` would find it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainers.cli import UsageError
from trainers.files import publish, write_json_atomic

META = "palgan.json"
PREFIX = "step_"
BEST = "best"   # <run>/checkpoints/best/step_*: the LSTM's checkpoint of the best validation so far


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete .tmp-* folders are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, config: dict, keep: int,
                    extra: dict | None = None) -> Path:
    """Every rank calls this (``save_state`` writes each rank's RNG); rank 0 renames and prunes."""
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / META, {"step": step, "config": config, "extra": extra or {},
                                       "processes": accelerator.num_processes})
        publish(tmp, final)   # re-saving the same step (the end of a run right after a save) replaces it
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_meta(ckpt: Path) -> dict:
    """The step/config record of a checkpoint; a UsageError if it is missing or unreadable."""
    meta = ckpt / META
    try:
        data = json.loads(meta.read_text())
        int(data["step"])
        return data
    except FileNotFoundError:
        raise UsageError(f"checkpoint {ckpt} has no {META}; it is not a palgan checkpoint "
                         "(pass a folder under <run>/checkpoints/)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"checkpoint {meta} is corrupt ({err.__class__.__name__}); "
                         "delete that folder to fall back to the previous checkpoint") from None


def check_processes(ckpt: Path, meta: dict, processes: int) -> None:
    """Refuse a checkpoint written by another number of processes: each rank's data stream and
    RNG file, and the steps per epoch, depend on it, so the run would not continue as it began."""
    saved = meta.get("processes")
    if saved is not None and saved != processes:
        raise UsageError(f"--resume: checkpoint {ckpt} was written by {saved} process(es), not "
                         f"{processes}; resume with {saved} (accelerate launch --num_processes "
                         f"{saved}) or start a new --run-name")


def latest_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from: the latest one, checked against the number of
    processes of this launch (``WORLD_SIZE``, as set by ``accelerate launch``) before any starts."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start "
                         "fresh, or pass the --out-dir/--run-name of the run to continue")
    check_processes(found[-1], read_meta(found[-1]), int(os.environ.get("WORLD_SIZE", "1")))
    return found[-1]


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint folder, a ``checkpoints/`` folder or a run folder; return a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist; pass a run folder or one of its "
                         "checkpoints/step_* folders")
    if (path / META).exists():
        return path
    for candidate in (path, path / "checkpoints"):
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise UsageError(f"no checkpoint found in {path}; pass a run folder or one of its "
                     "checkpoints/step_* folders")


def load_checkpoint(accelerator, ckpt: Path) -> dict:
    """Restore Accelerate's state from ``ckpt`` and return its meta record.

    Refuses a checkpoint written by another number of processes: each rank's data stream and
    RNG file, and the steps per epoch, depend on it, so the run would not continue as it began."""
    meta = read_meta(ckpt)
    check_processes(ckpt, meta, accelerator.num_processes)
    try:
        accelerator.load_state(str(ckpt))
    except Exception as err:  # corrupt or truncated tensors, wrong shapes, missing files
        raise UsageError(f"checkpoint {ckpt} cannot be loaded ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''}); delete it to fall "
                         "back to the previous one, or start without --resume") from None
    return meta
