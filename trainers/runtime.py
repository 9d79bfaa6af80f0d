"""What both trainers need around the loop: the Accelerator, seeds, run folders, preemption."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainers.cli import DIST_TIMEOUT_S, INPUT_ERRORS, JobFailure, UsageError, require_writable_dir
from trainers.files import write_text_atomic
from trainers.tracking import log_with


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
    from accelerate.utils import InitProcessGroupKwargs

    mixed_precision = effective_precision(mixed_precision)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; use bf16 on a CPU")
    if launched_processes() == 1:
        clear_accelerate_state_for(mixed_precision)
    # cpu=True on a machine with no GPU: under `accelerate launch` with several processes
    # (torchrun underneath) Accelerate then runs DDP over gloo instead of looking for CUDA.
    if not torch.cuda.is_available():
        guard_ddp_logger_on_gloo()
    os.environ.update(nccl_error_settings(torch.cuda.is_available(), launched_processes(), os.environ))
    handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with(use_wandb),
                       project_dir=str(run_dir), kwargs_handlers=handlers,
                       cpu=not torch.cuda.is_available())


def nccl_error_settings(cuda: bool, world: int, environ) -> dict[str, str]:
    """What a multi-GPU job sets before its NCCL process group exists, so that a dead or stuck rank
    ends in Python, as the one-line error of ``collective_failures``.

    Without it, a rank waiting on a dead peer blocks in a host sync (``.item()``, ``.cpu()``) and,
    after the timeout, NCCL's watchdog thread aborts the process with a C++ trace.
    ``TORCH_NCCL_BLOCKING_WAIT=1`` (torch's ProcessGroupNCCL environment variables) makes each
    collective's wait block the calling thread and raise ``DistBackendError`` at the timeout, which
    ``collective_failures`` turns into its line. A value the user set wins
    (``TORCH_NCCL_BLOCKING_WAIT=0`` for the asynchronous waits, at the cost of that error). What the
    blocking waits cost in step time has not been measured on a multi-GPU machine."""
    if not cuda or world < 2 or "TORCH_NCCL_BLOCKING_WAIT" in environ:
        return {}
    return {"TORCH_NCCL_BLOCKING_WAIT": "1"}


def clear_accelerate_state_for(mixed_precision: str) -> None:
    """Let one process train runs of different precisions one after the other (tests, benchmarks,
    a Ray actor that Tune reuses for the next trial).

    Accelerate keeps one state per process, fixed by its first ``Accelerator``: another one with a
    different ``mixed_precision`` raises ValueError ("restart your runtime"), and accelerate (up to
    1.16 at least) has no public reset (huggingface/accelerate#2463, #1131). The reset it does ship
    is its test helper's, run after every test: ``AccelerateTestCase.tearDown``. Only used when
    the state holds another precision; an Accelerator made before it is not to be used again."""
    from accelerate.state import AcceleratorState, is_initialized
    if not is_initialized() or AcceleratorState().mixed_precision == mixed_precision:
        return
    from accelerate.test_utils.testing import AccelerateTestCase
    AccelerateTestCase().tearDown()


# Workaround for a torch bug: DDP over gloo with TORCH_DISTRIBUTED_DEBUG=DETAIL kills the process
# (SIGSEGV) in DDP's constructor, in c10d::Logger::set_env_variables: to log gloo's thread count it
# casts the process group's gloo backend to ProcessGroupGloo, but in DETAIL mode that backend is the
# ProcessGroupWrapper that runs the collective checks. Reproduced on torch 2.14.1 (a 6-line torchrun
# script: DDP(nn.Linear) on gloo, SIGSEGV with DETAIL, fine with OFF or INFO); no upstream issue found
# to cite. DDP has no switch for this construction record (a log line), so the guard skips it and the
# collective checks stay. Applied to torch up to 2.14.1, the newest this project allows; later
# versions run unguarded until checked.
DDP_LOGGER_GUARD_BELOW = (2, 14, 2)


def guard_ddp_logger_on_gloo() -> None:
    """Skip DDP's construction record where it would crash (see above); nothing elsewhere."""
    if not (dist.is_available() and torch.__version__ < DDP_LOGGER_GUARD_BELOW and launched_processes() > 1
            and dist.get_debug_level() == dist.DebugLevel.DETAIL):
        return
    if getattr(dist.Logger, "skips_construction_record", False):
        return

    class Logger(dist.Logger):
        skips_construction_record = True

        def set_construction_data_and_log(self, *args, **kwargs):
            pass

    dist.Logger = Logger


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun, SLURM via them) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Where collectives are called from: torch.distributed, DDP, and the autograd engine, from which
# DDP's reducer all-reduces the gradients during backward.
_COLLECTIVE_CALLERS = (str(Path(dist.__file__).parent) + os.sep, str(Path(torch.nn.parallel.__file__).parent) + os.sep,
                       torch.autograd.graph.__file__)


def collective_failure_cause(err: BaseException) -> str | None:
    """``"died"``, ``"stuck"`` or ``"mismatch"`` if ``err`` is a failed collective (or the store or
    network under it), else None."""
    if not dist.is_available():
        return None
    if isinstance(err, dist.DistNetworkError):     # a peer or the store cannot be reached
        return "died"
    if isinstance(err, dist.DistStoreError):       # a wait in the store ran out: a rank did not come
        return "stuck"
    if not isinstance(err, dist.DistError):        # (DistBackendError, NCCL's, says no more: its text does)
        # torch 2.14.1's gloo backend and DETAIL's ProcessGroupWrapper raise none of those types: a
        # killed peer, a peer stuck past the timeout and a collective mismatch all come as a plain
        # RuntimeError (measured), from the collective's call or, through DDP's reducer, from the
        # autograd engine. So the narrowest rule torch allows: exactly RuntimeError (c10::Error's type;
        # CUDA, out-of-memory and DistError are subclasses), raised by C++ called straight from
        # _COLLECTIVE_CALLERS (theirs is the innermost frame, and its line a call, not a Python raise);
        # the cause is then only in the text c10d writes.
        raised_at = traceback.extract_tb(err.__traceback__)[-1:]
        if type(err) is not RuntimeError or not raised_at or (raised_at[0].line or "").startswith("raise") \
                or not raised_at[0].filename.startswith(_COLLECTIVE_CALLERS):
            return None
    text = str(err).lower()
    if "mismatch between collectives" in text:
        return "mismatch"
    if "monitoredbarrier" in text or "timed out" in text or "timeout" in text:
        return "stuck"
    return "died"


@contextmanager
def collective_failures(world: int, timeout: float, ckpt_dir: Path | None):
    """Turn a failed or timed-out collective into a one-line JobFailure naming the likely cause.

    With one process nothing changes. Checkpoints are written atomically, so whatever was saved
    before the failure is intact and ``--resume`` continues from it."""
    try:
        yield
    except Exception as err:
        cause = collective_failure_cause(err) if world > 1 else None
        if cause is None:
            raise
        text = str(err).strip()
        first = text.splitlines()[0][:200] if text else err.__class__.__name__
        kept = f"checkpoints in {ckpt_dir} are kept; " if ckpt_dir is not None else ""
        why = {"died": "another rank died or lost its connection",
               "stuck": f"a collective waited more than --dist-timeout {timeout:g}s for another rank: it is "
                        "stuck or gone, or its work alone took longer (raise --dist-timeout)",
               "mismatch": "the ranks called different collectives (TORCH_DISTRIBUTED_DEBUG=DETAIL found it)"}[cause]
        from trainers.checkpoint import restarts_left
        then = ("the launcher restarts the job, and --resume auto continues from the last checkpoint"
                if restarts_left() else "rerun the same launch command with --resume")
        raise JobFailure(f"a collective across the {world} processes failed ({first}): {why}; {kept}{then}") from None


class Shards:
    """How the processes of a job share one evaluation of ``n`` items.

    Each rank takes a contiguous part (``part``: Accelerate's ``split_between_processes``);
    ``gather`` puts the parts back in rank order, so every rank ends with exactly the rows one
    process would have computed. ``gather`` is a collective: every rank calls it, in the same order.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> range:
        """This rank's indices of the ``n`` items (all of them with one process)."""
        if self.world == 1:
            return range(n)
        with self.accelerator.split_between_processes(list(range(n))) as mine:
            return range(mine[0], mine[-1] + 1) if mine else range(n, n)

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's rows ``(len(part(n)), ...)`` -> all ``n`` rows in order, on the CPU, on every rank."""
        if self.world == 1:
            return local
        acc = self.accelerator
        counts = acc.gather(torch.tensor([len(local)], device=acc.device)).tolist()     # rows on each rank
        rows = acc.gather(acc.pad_across_processes(local.to(acc.device), dim=0)).cpu()  # (world * max, ...)
        if sum(counts) != n:
            raise ValueError(f"the ranks hold {sum(counts)} rows between them, not {n}")
        k = max(counts)
        return torch.cat([rows[r * k: r * k + c] for r, c in enumerate(counts)])


SINGLE = Shards()   # one process does all the work


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator_for(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*keys))


def check_run_dir_is_free(run_dir: Path, resume: bool) -> None:
    """Unless resuming, the run folder holds no finished or checkpointed run."""
    if resume:
        return
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) \
            or (run_dir / "metrics.json").exists():
        raise UsageError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                         "or choose another --run-name")


LOCK, OWNER = ".palgan.lock", ".palgan.owner"   # in the run folder: the lock, and who holds it


@contextmanager
def hold_run_dir(run_dir: Path, resume: bool):
    """One writer per run folder: the launch's main process holds an exclusive lock on it for the
    whole run (``filelock``: an OS lock, gone when the process dies, even on SIGKILL). A second
    launch on the folder, with or without --resume, stops with one line naming the holder. Then the
    folder must be free of a finished or checkpointed run unless resuming (``check_run_dir_is_free``).
    Only the process of global rank 0 locks; the other ranks of its job write nothing there."""
    import socket
    from filelock import FileLock, Timeout

    require_writable_dir(run_dir.parent, "--out-dir")
    require_writable_dir(run_dir, "--run-name")
    if int(os.environ.get("RANK", "0")) != 0:
        check_run_dir_is_free(run_dir, resume)   # every rank refuses a finished run, not only rank 0
        yield
        return
    made = None   # the outermost folder this launch creates, removed again if it is refused
    if not run_dir.exists():
        made = run_dir
        while not made.parent.exists():
            made = made.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = (run_dir / OWNER).read_text().strip() if (run_dir / OWNER).exists() else "another process"
        raise UsageError(f"run folder {run_dir} is in use by {holder}; wait for that run to end (or stop it), "
                         "or choose another --run-name") from None
    try:
        write_text_atomic(run_dir / OWNER, f"process {os.getpid()} on {socket.gethostname()}\n")
        check_run_dir_is_free(run_dir, resume)
        yield
    except INPUT_ERRORS:   # refused before any work: a folder made for this launch goes again
        if made is not None and {p.name for p in run_dir.iterdir()} <= {LOCK, OWNER}:
            lock.release()
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        if lock.is_locked:
            (run_dir / OWNER).unlink(missing_ok=True)
            lock.release()


class StopFlag:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit cleanly.

    The handler only notes the request (it may run between any two lines); ``should_stop`` sets
    Accelerate's trigger from it and reads it with ``check_trigger``, an all-reduce over the
    processes, so every rank stops after the same step and the collective checkpoint cannot
    deadlock. ``should_stop`` is a collective (and a host sync): every rank calls it at the same steps.
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
        if self.requested:   # set again at each check: a stop once asked for stays asked for
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
