"""Faults a run survives without a person: a full disk while checkpointing, resuming on another number
of processes, and a killed rank that the launcher restarts (`--max_restarts` with `--resume auto`).

The full disk is a real one where the kernel allows it: a 1.5 MiB tmpfs mounted in a user and mount
namespace of the test's own (`unshare -rm`, no root needed), so every write of the run (accelerate's
`save_state`, safetensors, torch.save, the JSON records, wandb) meets the kernel's own ENOSPC, partial
writes included. Where user namespaces are off the same path is checked in process, with a `torch.save`
that writes part of its file and then fails with ENOSPC as a full disk does.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_usage_error, clean_env, free_port, rank_facts, wait_for

TWO_PROCS = ROOT / "launch" / "cpu_2proc.yaml"
DETAIL = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL", "PALGAN_DEBUG": "1"}
# the default LSTM run, only shrunk (the width stays: its checkpoints are what fills the disk)
LSTM = ["trainers/lstm.py", "--val-size", "200", "--batch-size", "16", "--eval-every", "20",
        "--checkpoint-every", "20", "--no-progress"]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def leftovers(run: Path) -> list[str]:
    """Temporary files or folders of an atomic write anywhere in the run folder."""
    return [str(p) for p in run.rglob("*") if ".tmp-" in p.name]


# --- a full disk --------------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_fails_together_removes_the_temporary_and_keeps_the_rest(tmp_path,
                                                                                                   monkeypatch):
    """In process: the second checkpoint's optimiser file fills the disk half way. save_checkpoint raises
    DiskFull naming the last complete checkpoint, the temporary folder is gone, and the first checkpoint
    is byte for byte as it was (pruning to keep=1 waits for a complete new one)."""
    from accelerate import Accelerator
    from trainers.checkpoint import DiskFull, list_checkpoints, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(torch.nn.Linear(4, 3), torch.optim.Adam(torch.nn.Linear(4, 3).parameters()))
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(accelerator, ckpts, 1, {"lr": 1}, keep=1)
    before = files(ckpts)

    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\0" * 100)   # what fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(DiskFull) as failure:
        save_checkpoint(accelerator, ckpts, 2, {"lr": 1}, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    line = str(failure.value)
    assert "\n" not in line and line.startswith("the disk is full (writing "), line
    assert f"the last complete checkpoint is {ckpts / 'step_00000001'}" in line
    assert line.endswith("free space and rerun with --resume"), line
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000001"]
    assert files(ckpts) == before and not leftovers(tmp_path)


def can_mount_a_small_disk() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k none /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_a_small_disk(), reason="needs user namespaces (unshare -rm) to mount a tmpfs")
def test_lstm_on_a_real_full_disk_ends_with_one_line_and_resume_on_a_roomy_disk_finishes(tmp_path):
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    args = " ".join(map(str, [*LSTM, "--steps", "200", "--out-dir", disk, "--run-name", "full"]))
    # the tmpfs lives only in the namespace: copy what the run left there before it goes
    script = (f"mount -t tmpfs -o size=1536k none {disk} && {sys.executable} {args}; rc=$?; "
              f"cp -a {disk}/. {kept}/; exit $rc")
    kept.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    line, run = lines[0], kept / "full"
    last = step_dirs(run)[-1]
    assert line.startswith("lstm.py: error: the disk is full (writing "), line
    assert f"the last complete checkpoint is {disk / 'full' / 'checkpoints' / last}; free space and rerun with --resume" \
        in line, line
    assert not leftovers(run), leftovers(run)                       # no half-written temporary stays
    meta = json.loads((run / "checkpoints" / last / "palgan.json").read_text())
    from safetensors.torch import load_file
    assert meta["step"] == int(last[5:]) and load_file(str(run / "checkpoints" / last / "model.safetensors"))

    roomy = tmp_path / "roomy"
    shutil.copytree(run, roomy / "full")
    done = subprocess.run([sys.executable, *LSTM, "--steps", "200", "--out-dir", roomy, "--run-name", "full",
                           "--resume"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming full from step {meta['step']}" in done.stdout
    assert json.loads((roomy / "full" / "metrics.json").read_text())["finished"]
