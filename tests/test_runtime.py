"""trainers/runtime.py: one process building Accelerators of different precisions one after the other,
the stop request, the DDP logger guard, and (3 processes under torchrun, DETAIL mode) the evaluation's
shares and the stop agreed by every rank."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from conftest import ROOT, clean_env, free_port
from trainers.runtime import StopFlag, guard_ddp_logger_on_gloo, make_accelerator


def matmul_dtype(accelerator) -> torch.dtype:
    """The dtype a matmul gets under this accelerator's autocast."""
    x = torch.ones(4, 4, device=accelerator.device)
    with accelerator.autocast():
        return (x @ x).dtype


def test_accelerators_made_one_after_another_keep_their_own_precision(tmp_path, monkeypatch):
    from accelerate import Accelerator
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    first = make_accelerator("no", False, tmp_path)
    assert first.mixed_precision == "no" and matmul_dtype(first) == torch.float32
    second = make_accelerator("bf16", False, tmp_path)
    assert second.mixed_precision == "bf16" and matmul_dtype(second) == torch.bfloat16
    # what Accelerate alone does with a second precision in one process (why make_accelerator resets)
    with pytest.raises(ValueError, match="mixed_precision"):
        Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    third = make_accelerator("no", False, tmp_path)               # bf16 does not leak into the next run
    assert third.mixed_precision == "no" and matmul_dtype(third) == torch.float32
    again = make_accelerator("no", False, tmp_path)               # the same precision: the state is reused
    assert again.mixed_precision == "no" and matmul_dtype(again) == torch.float32


def test_sigterm_asks_the_loop_to_stop_and_the_request_stays(tmp_path):
    accelerator = make_accelerator("no", False, tmp_path)
    stop = StopFlag()
    try:
        assert not stop.should_stop(accelerator)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(accelerator) and stop.should_stop(accelerator)
    finally:
        stop.restore()


def test_the_ddp_logger_guard_applies_only_where_the_crash_is(monkeypatch):
    original = dist.Logger
    monkeypatch.setattr(dist, "Logger", original)                # put back after the test
    level = dist.get_debug_level()

    def guarded(world: int, version: str, debug) -> bool:
        monkeypatch.setattr(dist, "Logger", original)
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setattr(torch, "__version__", TorchVersion(version))
        dist.set_debug_level(debug)
        guard_ddp_logger_on_gloo()
        return dist.Logger is not original and issubclass(dist.Logger, original)

    try:
        assert guarded(2, "2.14.1", dist.DebugLevel.DETAIL)
        assert not guarded(1, "2.14.1", dist.DebugLevel.DETAIL)    # one process: no DDP
        assert not guarded(2, "2.14.1", dist.DebugLevel.INFO)      # no ProcessGroupWrapper
        assert not guarded(2, "2.15.0", dist.DebugLevel.DETAIL)    # a torch not known to crash
    finally:
        dist.set_debug_level(level)


WORKER = '''
import json, os, signal, sys
from pathlib import Path
import torch
from trainers.runtime import Shards, StopFlag, make_accelerator

out = Path(sys.argv[1])
accelerator = make_accelerator("no", False, out)
rank = accelerator.process_index

# DDP over gloo in DETAIL mode: without the logger guard this segfaults in the constructor
model = accelerator.prepare(torch.nn.Linear(4, 2))
accelerator.backward(model(torch.ones(3, 4)).sum())

shards, gathered = Shards(accelerator), {}
for n in (0, 1, 2, 3, 5, 7, 10):
    part = shards.part(n)
    rows = torch.arange(n * 2, dtype=torch.float64).reshape(n, 2)[part.start:part.stop]   # this rank's rows
    gathered[n] = {"part": [part.start, part.stop], "all": shards.gather(rows, n).tolist()}

stop, stopped_at = StopFlag(), None
for step in range(1, 11):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)     # only rank 1 is told to stop
    if stop.should_stop(accelerator):
        stopped_at = step
        break
stop.restore()
(out / f"rank{rank}.json").write_text(json.dumps({"gathered": gathered, "stopped_at": stopped_at}))
accelerator.wait_for_everyone()
accelerator.end_training()   # as the trainers end: the process group goes before the interpreter exits
'''


def test_nccl_jobs_wait_blocking_so_a_lost_rank_surfaces_in_python():
    from trainers.runtime import nccl_error_settings
    assert nccl_error_settings(cuda=True, world=2, environ={}) == {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    assert nccl_error_settings(cuda=True, world=2, environ={"TORCH_NCCL_BLOCKING_WAIT": "0"}) == {}   # the user's
    assert nccl_error_settings(cuda=True, world=1, environ={}) == {}     # one process: no process group
    assert nccl_error_settings(cuda=False, world=2, environ={}) == {}    # gloo on CPUs raises in Python already


def test_three_processes_share_evaluations_like_one_and_stop_after_the_same_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
                           "--master-port", str(free_port()), str(script), str(tmp_path)],
                          cwd=ROOT, env=clean_env(TORCH_DISTRIBUTED_DEBUG="DETAIL"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [r["stopped_at"] for r in ranks] == [3, 3, 3]          # rank 1's SIGTERM stops every rank at once
    for n in (0, 1, 2, 3, 5, 7, 10):
        one_process = torch.arange(n * 2, dtype=torch.float64).reshape(n, 2).tolist()
        assert all(r["gathered"][str(n)]["all"] == one_process for r in ranks), n
        parts = [range(*r["gathered"][str(n)]["part"]) for r in ranks]
        assert [i for part in parts for i in part] == list(range(n)), (n, parts)   # contiguous, in rank order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1, (n, parts)         # balanced
