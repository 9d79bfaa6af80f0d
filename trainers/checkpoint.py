"""Atomic checkpoints: ``accelerator.save_state`` plus the step and the config.

Layout: ``<run>/checkpoints/step_00001000/`` holding Accelerate's files (models, optimisers,
scaler, RNG of every rank) and ``palgan.json`` (step, config, extra state). A checkpoint is
written to a ``.tmp-*`` folder and renamed into place only once it is complete, so a
crash mid-write never leaves a half checkpoint where ``--resume`` would find it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from trainers.cli import JobFailure, UsageError
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


DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
             errno.EFBIG: "a file reached the size limit"}   # errnos that more room fixes
NEARLY_FULL = 1 << 20   # bytes free under which a failed write counts as a full disk
# torch.save reports a full disk as a RuntimeError from its C++ stream ("basic_ios::clear: iostream
# error", "unexpected pos"), not an OSError (measured with torch 2.14.1 on a full tmpfs), so a
# serializer's RuntimeError is taken for a write error too, and the free space tells a full disk.
WRITE_ERRORS = (OSError, RuntimeError)


class DiskFull(JobFailure):
    """No room for a file the run writes: one line naming the last complete checkpoint, exit code 1."""

    def __init__(self, message: str, cause: BaseException, what: str):
        super().__init__(message)
        self.cause, self.what = cause, what


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full(err: BaseException, folder: Path) -> bool:
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return True
    return isinstance(err, WRITE_ERRORS) and free_bytes(folder) < NEARLY_FULL


def disk_full_error(err: BaseException, ckpt_dir: Path, what: str = "") -> DiskFull:
    """The one line for ``err``: what failed, the last complete checkpoint, and what to do."""
    found = list_checkpoints(ckpt_dir)
    last = f"the last complete checkpoint is {found[-1]}" if found else f"no checkpoint was completed in {ckpt_dir}"
    errno_ = err.errno if isinstance(err, OSError) else errno.ENOSPC
    if not what and isinstance(err, OSError) and err.filename:
        what = f"writing {err.filename}"
    why = err.strerror if isinstance(err, OSError) and err.strerror else f"{free_bytes(ckpt_dir)} bytes free"
    return DiskFull(f"{DISK_FULL.get(errno_, 'the disk is full')} ({what or 'writing the run files'}: {why}); "
                    f"{last}; free space and rerun with --resume", err, what)


@contextmanager
def full_disk_is_one_line(ckpt_dir: Path):
    """A full disk (ENOSPC, EDQUOT, EFBIG, or a serializer's error with the disk full) anywhere in
    the block (a checkpoint, a figure, metrics.json) ends the run with ``disk_full_error``'s line
    instead of a traceback. Every file is written atomically, so what was complete stays complete."""
    try:
        yield
    except DiskFull as err:   # from save_checkpoint: name the run's last checkpoint (not best/'s)
        raise disk_full_error(err.cause, ckpt_dir, err.what) from None
    except WRITE_ERRORS as err:
        if not is_disk_full(err, ckpt_dir):
            raise
        raise disk_full_error(err, ckpt_dir) from None


def _agree(accelerator, failed: bool) -> bool:
    """True on every rank if any rank failed (a collective: every rank calls it, at the same point)."""
    if accelerator.num_processes == 1:
        return failed
    import torch
    flag = torch.tensor([int(failed)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="max").item())


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, config: dict, keep: int,
                    extra: dict | None = None) -> Path:
    """Every rank calls this (``save_state`` writes each rank's RNG); rank 0 renames and prunes.

    A write that fails on any rank (a full disk, say) fails on all of them together: the ranks
    agree on it before going on, rank 0 removes the temporary folder, and every rank raises a
    one-line error (``DiskFull`` when the disk is full). Old checkpoints are pruned only once the
    new one is in place."""
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".tmp-{checkpoint_name(step)}"
    error: BaseException | None = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            error = err
    accelerator.wait_for_everyone()
    if error is None:
        try:
            accelerator.save_state(str(tmp))
        except WRITE_ERRORS as err:
            error = err
    if not _agree(accelerator, error is not None) and accelerator.is_main_process:
        try:
            write_json_atomic(tmp / META, {"step": step, "config": config, "extra": extra or {},
                                           "processes": accelerator.num_processes})
            publish(tmp, final)   # re-saving the same step (the end of a run right after a save) replaces it
        except OSError as err:
            error = err
    if _agree(accelerator, error is not None):
        full = is_disk_full(error, tmp) if error is not None else free_bytes(tmp) < NEARLY_FULL
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if full:
            raise disk_full_error(error or OSError(errno.ENOSPC, "on another process"), ckpt_dir,
                                  f"writing checkpoint {final.parent.name}/{final.name}")
        first = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}" if error else "on another process"
        raise JobFailure(f"writing checkpoint {final.name} failed ({first}); its temporary "
                         "folder was removed and the older checkpoints are kept") from error
    if accelerator.is_main_process:
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


def elastic_batch(ckpt: Path, meta: dict, batch_size: int, processes: int) -> tuple[int, str | None]:
    """Resuming on another number of processes: the per-process ``--batch-size`` with which
    ``processes`` processes keep the checkpoint's global batch (its processes x its --batch-size),
    and the start-up line saying so (None when the number of processes is the same). A UsageError
    where the global batch cannot be kept: ``processes`` does not divide it, or an explicit
    --batch-size gives another one.

    Each rank's data and noise streams are functions of (seed, rank, world, step), so the run goes
    on from the same step with the new world's streams; it is bit-exact only on the same number."""
    saved = int(meta.get("processes") or 1)
    if saved == processes:
        return batch_size, None
    saved_batch = int(meta.get("config", {}).get("batch_size", batch_size))
    global_batch = saved * saved_batch
    if batch_size * processes == global_batch:   # already given per process for the new count
        per_process = batch_size
    elif batch_size != saved_batch:
        raise UsageError(f"--resume: --batch-size {batch_size} on {processes} process(es) is a global batch of "
                         f"{batch_size * processes}, not the {global_batch} ({saved} x {saved_batch}) of checkpoint "
                         f"{ckpt}; leave --batch-size at {saved_batch} and palgan splits the global batch")
    elif global_batch % processes:
        raise UsageError(f"--resume: checkpoint {ckpt} was trained with a global batch of {global_batch} "
                         f"({saved} process(es) x --batch-size {saved_batch}), which {processes} processes cannot "
                         f"split evenly; resume on a number of processes that divides {global_batch}, "
                         "or start a new --run-name")
    else:
        per_process = global_batch // processes
    return per_process, (f"continuing on {processes} process(es) instead of {saved}: --batch-size {per_process} "
                         f"per process keeps the global batch of {global_batch} (bit-exact only on {saved})")


def latest_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from: the latest complete one."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start "
                         "fresh, or pass the --out-dir/--run-name of the run to continue")
    read_meta(found[-1])   # a corrupt one is refused here, before any work
    return found[-1]


def resume_point(ckpt_dir: Path, resume: bool | str) -> Path | None:
    """Where a run starts: None (fresh), or the checkpoint to continue from. ``--resume`` needs
    one; ``--resume auto`` takes the latest when there is one and starts fresh otherwise, so the
    same command serves a first start and every restart (``accelerate launch --max_restarts``)."""
    if resume == "auto":
        return latest_checkpoint(ckpt_dir) if list_checkpoints(ckpt_dir) else None
    return latest_checkpoint(ckpt_dir) if resume else None


def restarts_left() -> int:
    """How many more times torchrun (``--max_restarts``) restarts this process group if it fails."""
    most = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    return max(0, most - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))


def restart_note() -> str:
    """`` (restart k of the launcher's n)`` when torchrun restarted this process group, else ``""``."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    most = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    return f" (restart {count} of {most})" if count and most else (f" (restart {count})" if count else "")


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
    """Restore Accelerate's state from ``ckpt`` and return its meta record. On another number of
    processes than wrote it (see ``elastic_batch``), a rank without an RNG file of its own in the
    checkpoint keeps the RNG state it has: palgan's data and noise streams do not draw from it."""
    meta = read_meta(ckpt)
    try:
        accelerator.load_state(str(ckpt))
    except Exception as err:  # corrupt or truncated tensors, wrong shapes, missing files
        raise UsageError(f"checkpoint {ckpt} cannot be loaded ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''}); delete it to fall "
                         "back to the previous one, or start without --resume") from None
    return meta
