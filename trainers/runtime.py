"""What both trainers need around the loop: the Accelerator, seeds, run folders, preemption."""
from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from trainers.cli import JobFailure, UsageError, arg, require_writable_dir
from trainers.tracking import log_with

MIXED_PRECISION = ("no", "bf16", "fp16")
# Seconds a rank waits in one collective before the job ends with an error. Long enough for the
# work rank 0 does alone while the others wait at a barrier (figures, wandb, checkpoint writes);
# short enough that a dead or stuck rank costs minutes, not the backends' 10-30 minutes.
DIST_TIMEOUT_S = 300


@dataclass
class RunConfig:
    """The logging and run fields that every trainer's config shares. ``GANConfig`` and
    ``LSTMConfig`` extend it with their own fields, which ``--help`` lists first."""
    # logging
    wandb: bool = arg(True, "log to wandb (offline without an API key); --no-wandb for none", "logging")
    wandb_project: str = arg("palgan", "wandb project", "logging")
    wandb_group: str = arg("", "wandb group (the sweep sets it to the sweep's name)", "logging")
    wandb_job_type: str = arg("train", "wandb job type, to group runs (the sweep sets sweep-trial)", "logging")
    # run
    out_dir: str = arg("runs", "root folder of runs", "run")
    run_name: str = arg("", "run folder name (default: made from the main settings, e.g. gan-cpu-demo-b16-s0 "
                            "or lstm-T5-h128-s0)", "run")
    seed: int = arg(0, "seed of the initial weights and of every random stream (data, noise)", "run")
    resume: bool = arg(False, "continue from the run's latest checkpoint", "run")
    checkpoint_every: int = arg(1000, "steps between checkpoints (the GAN also saves at each epoch end)", "run")
    keep_checkpoints: int = arg(3, "checkpoints kept (the oldest are deleted)", "run")
    progress: bool = arg(True, "show a tqdm bar on the main process", "run")
    dist_timeout: int = arg(DIST_TIMEOUT_S, "seconds a process waits in one collective before the job "
                            "ends with an error (a dead or stuck rank)", "run")

    def default_name(self) -> str:
        """The run folder's name when --run-name is empty (each trainer makes its own)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.run_name or self.default_name()

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir).resolve() / self.name


def effective_precision(flag: str) -> str:
    """``--mixed-precision`` when set to bf16/fp16, else the launch config's (``accelerate launch``
    exports it as ACCELERATE_MIXED_PRECISION), else ``no``."""
    if flag != "no":
        return flag
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def make_accelerator(mixed_precision: str, use_wandb: bool, run_dir: Path, kwargs_handlers=None,
                     dist_timeout: float = DIST_TIMEOUT_S):
    """An ``Accelerator`` for this process; CPU, one GPU or DDP is decided by ``accelerate launch``.

    ``kwargs_handlers`` go to ``Accelerator`` as they are (the GAN passes
    ``DistributedDataParallelKwargs(broadcast_buffers=False)`` for its SyncBatchNorm).
    ``dist_timeout`` (seconds) bounds every collective of the process group."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

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
    if not torch.cuda.is_available():
        guard_ddp_logger_on_gloo()
    handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with(use_wandb),
                       project_dir=str(run_dir), kwargs_handlers=handlers,
                       cpu=not torch.cuda.is_available())


def guard_ddp_logger_on_gloo() -> None:
    """Let DDP run over gloo with TORCH_DISTRIBUTED_DEBUG=DETAIL.

    In that mode the process group's gloo backend is wrapped for the collective checks, and
    torch 2.14's DDP logger casts the wrapper to the gloo backend while recording its
    construction data, which crashes the process (SIGSEGV) before the first step. The
    construction record is only a log line; skip it, keep the collective checks."""
    if os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() != "DETAIL":
        return
    import torch.distributed as dist
    if getattr(dist.Logger, "_palgan_guarded", False):
        return

    class GuardedLogger(dist.Logger):
        _palgan_guarded = True

        def set_construction_data_and_log(self, *args, **kwargs):
            pass

    dist.Logger = GuardedLogger


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun, SLURM via them) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Words in the errors that gloo, NCCL and torch.distributed raise when a peer is gone or late.
_COLLECTIVE_ERRORS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                      "gloo", "nccl", "processgroup", "peer", "rendezvous", "monitoredbarrier",
                      "[rank ")   # DDP's reducer raises these from the backward pass, outside torch.distributed


def _raised_in_distributed(err: BaseException) -> bool:
    """Whether ``err`` came from inside torch.distributed (a collective, the store, the launcher)."""
    tb = err.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


@contextmanager
def collective_failures(world: int, timeout: float, ckpt_dir: Path | None):
    """Turn a failed or timed-out collective into a one-line JobFailure naming the likely cause.

    With one process nothing changes. Checkpoints are written atomically, so whatever was saved
    before the failure is intact and ``--resume`` continues from it."""
    try:
        yield
    except RuntimeError as err:   # torch.distributed.DistError and gloo's errors are RuntimeErrors
        text = str(err).strip()
        first = text.splitlines()[0][:200] if text else err.__class__.__name__
        low = text.lower()
        is_dist = isinstance(err, getattr(torch.distributed, "DistError", ())) or _raised_in_distributed(err) \
            or any(word in low for word in _COLLECTIVE_ERRORS)
        if world <= 1 or not is_dist:
            raise
        kept = f"checkpoints in {ckpt_dir} are kept; " if ckpt_dir is not None else ""
        if "mismatch" in low:
            cause = "the ranks called different collectives (TORCH_DISTRIBUTED_DEBUG=DETAIL found it)"
        elif any(word in low for word in ("timed out", "timeout", "monitoredbarrier", " ms")):
            cause = (f"a collective waited more than --dist-timeout {timeout:g}s: another rank is stuck, "
                     "or its work alone took longer (raise --dist-timeout)")
        else:
            cause = "another rank died or lost its connection"
        raise JobFailure(f"a collective across the {world} processes failed ({first}): {cause}; "
                         f"{kept}rerun the same launch command with --resume") from None


class Shards:
    """How the processes of a job share one evaluation of ``n`` items.

    Rank r takes the r-th of ``world`` contiguous parts (``part``); ``gather`` puts the parts
    back in order, so every rank ends with exactly the rows one process would have computed.
    ``gather`` is a collective: every rank calls it, in the same order.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _size(self, n: int) -> int:
        return math.ceil(n / self.world)

    def part(self, n: int, rank: int | None = None) -> range:
        k, r = self._size(n), self.rank if rank is None else rank
        return range(min(r * k, n), min((r + 1) * k, n))

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's rows ``(len(part(n)), ...)`` -> all ``n`` rows in order, on the CPU, on every rank."""
        if self.world == 1:
            return local
        k = self._size(n)
        padded = local.new_zeros((k, *local.shape[1:]))          # equal shapes for all_gather
        padded[:len(local)] = local
        everyone = self.accelerator.gather(padded.to(self.accelerator.device)).cpu()   # (world * k, ...)
        return torch.cat([everyone[r * k: r * k + len(self.part(n, r))] for r in range(self.world)])


SINGLE = Shards()   # one process does all the work


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator_for(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*keys))


def check_run_dir_is_free(run_dir: Path, resume: bool) -> None:
    """The run folder can be written (no part of its path is a file) and, unless resuming, holds
    no finished or checkpointed run. Checked before any training."""
    require_writable_dir(run_dir.parent, "--out-dir")
    require_writable_dir(run_dir, "--run-name")
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
