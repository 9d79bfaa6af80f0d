"""What both trainers need around the loop: the Accelerator, seeds, run folders, preemption."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from trainers.cli import UsageError
from trainers.tracking import log_with

MIXED_PRECISION = ("no", "bf16", "fp16")


def effective_precision(flag: str) -> str:
    """``--mixed-precision`` when set to bf16/fp16, else the launch config's (``accelerate launch``
    exports it as ACCELERATE_MIXED_PRECISION), else ``no``."""
    if flag != "no":
        return flag
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def make_accelerator(mixed_precision: str, use_wandb: bool, run_dir: Path, kwargs_handlers=None):
    """An ``Accelerator`` for this process; CPU, one GPU or DDP is decided by ``accelerate launch``.

    ``kwargs_handlers`` go to ``Accelerator`` as they are (the GAN passes
    ``DistributedDataParallelKwargs(broadcast_buffers=False)`` for its SyncBatchNorm)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    mixed_precision = effective_precision(mixed_precision)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; use bf16 on a CPU")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several runs (tests, Ray actors): start from a clean state
        # so an earlier run's precision setting does not leak into this one.
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    # cpu=True on a machine with no GPU: under `accelerate launch` with several processes
    # (torchrun underneath) Accelerate then runs DDP over gloo instead of looking for CUDA.
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with(use_wandb),
                       project_dir=str(run_dir), kwargs_handlers=kwargs_handlers,
                       cpu=not torch.cuda.is_available())


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator_for(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*keys))


def check_run_dir_is_free(run_dir: Path, resume: bool) -> None:
    """Never train over a finished or checkpointed run unless asked to resume it."""
    if resume:
        return
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) \
            or (run_dir / "metrics.json").exists():
        raise UsageError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                         "or choose another --run-name")


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can finish its step, checkpoint and exit cleanly.

    With several processes the flag is all-reduced each step, so every rank stops after the
    same step and the collective checkpoint cannot deadlock.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fingerprint(*tensors: torch.Tensor) -> int:
    """A 63-bit hash of the tensors' exact bytes (equal iff bit-identical, barring collisions)."""
    import hashlib
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def gather_fingerprints(accelerator, value: int) -> list[int]:
    """Every rank's ``value``, in rank order (a list of one without distribution)."""
    if accelerator.num_processes == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.int64, device=accelerator.device)
    return [int(v) for v in accelerator.gather(t).tolist()]
