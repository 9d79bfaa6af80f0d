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
from pathlib import Path

import pytest
import torch

from conftest import ROOT, clean_env, free_port, rank_facts, rank_pids, wait_for

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


# --- a killed rank, restarted by the launcher ----------------------------------------------------

# torchrun's restarts need the c10d rendezvous with its own store per attempt (see docs/scaling.md)
RESTARTS = ["--rdzv_backend", "c10d", "--max_restarts", "1"]
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launch_cmd(args, launcher_flags=()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCS),
            "--main_process_port", str(free_port()), *launcher_flags, *map(str, args)]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run / "checkpoints" / step_dirs(run)[-1] / "model.safetensors"))


def test_a_killed_rank_is_restarted_by_the_launcher_and_the_run_ends_bit_exact(tmp_path):
    """2 CPU processes, `--max_restarts 1 --resume auto`: SIGKILL rank 1 after the checkpoint at step 20.
    torchrun restarts the group, the run continues from its last checkpoint by itself, the launch exits 0,
    and the final weights equal an uninterrupted 2-process run's, bit for bit."""
    args = [*LSTM, "--hidden-dim", "16", "--steps", "60", "--out-dir", tmp_path, "--resume", "auto"]
    ref = subprocess.run(launch_cmd([*args, "--run-name", "ref"]), cwd=ROOT, env=clean_env(**DETAIL),
                         capture_output=True, text=True, timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run, log = tmp_path / "cut", tmp_path / "cut.log"
    with open(log, "w") as out:
        child = subprocess.Popen(launch_cmd([*args, "--run-name", "cut"], RESTARTS), cwd=ROOT,
                                 env=clean_env(**DETAIL, **RESTART_ENV), stdout=out, stderr=subprocess.STDOUT)
    wait_for(child, lambda: (run / "checkpoints" / "step_00000020").is_dir(), "the checkpoint at step 20", 300)
    ranks = rank_pids(child.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert child.wait(timeout=400) == 0, log.read_text()[-4000:]
    text = log.read_text()
    resumed = [line for line in text.splitlines() if line.startswith("resuming cut from step ")]
    assert len(resumed) == 1 and resumed[0].endswith("(restart 1 of 1)"), text[-4000:]
    assert int(resumed[0].split()[4]) >= 20
    m = json.loads((run / "metrics.json").read_text())
    assert m["finished"] and m["steps"] == 60 and m["processes"] == 2
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(set(rank_facts(run)["weights"])) == 1
    # the first attempt's rank 0 said why it stopped, once, and that the launcher restarts it
    failed = [line for line in text.splitlines() if "lstm.py: error:" in line]
    assert len(failed) == 1 and "the launcher restarts the job" in failed[0], failed


# --- resuming on another number of processes ------------------------------------------------------

def test_lstm_resumes_from_one_process_on_two_and_back_keeping_the_global_batch(tmp_path):
    """1 process x batch 32 -> 2 processes x 16 -> 1 process x 32: each launch says it continues on N
    processes instead of M, every rank's weights right after loading equal the checkpoint's, and the
    run finishes. (Bit-exact only on the same number of processes: not asserted across the change.)"""
    from safetensors.torch import load_file
    from trainers.debug import fingerprint
    base = [*LSTM, "--hidden-dim", "16", "--batch-size", "32", "--out-dir", tmp_path, "--run-name", "el"]
    run = tmp_path / "el"
    one = subprocess.run([sys.executable, *base, "--steps", "20"], cwd=ROOT, env=clean_env(**DETAIL),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def loaded_as_saved(step: int, world: int):
        saved = load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))
        from trainers.cli import build
        from trainers.lstm import LSTMConfig, build_model
        order = build_model(build(LSTMConfig, hidden_dim=16)).state_dict()   # the model's own key order
        assert rank_facts(run)["loaded_weights"] == [fingerprint(*(saved[k] for k in order))] * world

    two = subprocess.run(launch_cmd([*base, "--steps", "40", "--resume"]), cwd=ROOT, env=clean_env(**DETAIL),
                         capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("el: continuing on 2 process(es) instead of 1: --batch-size 16 per process keeps "
                            "the global batch of 32") == 1, two.stdout[-3000:]
    loaded_as_saved(20, 2)
    m = json.loads((run / "metrics.json").read_text())
    assert (m["processes"], m["resumed_from_processes"], m["steps"], m["config"]["batch_size"]) == (2, 1, 40, 16)

    back = subprocess.run([sys.executable, *base, "--steps", "60", "--resume"], cwd=ROOT, env=clean_env(**DETAIL),
                          capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "el: continuing on 1 process(es) instead of 2: --batch-size 32 per process" in back.stdout
    loaded_as_saved(40, 1)
    m = json.loads((run / "metrics.json").read_text())
    assert (m["processes"], m["resumed_from_processes"], m["steps"], m["finished"]) == (1, 2, 60, True)

    # a global batch the new count cannot split: one line, from rank 0 alone, before anything changes
    before = files(run)
    odd = subprocess.run(launch_cmd([*base, "--batch-size", "33", "--steps", "80", "--resume", "--no-wandb"]),
                         cwd=ROOT, env=clean_env(**DETAIL), capture_output=True, text=True, timeout=300)
    assert odd.returncode != 0
    lines = [line for line in odd.stderr.splitlines() if "lstm.py: error:" in line]
    assert len(lines) == 1 and "--batch-size 33 on 2 process(es) is a global batch of 66, not the 32" in lines[0], \
        odd.stderr[-3000:]
    assert 'File "' + str(ROOT / "trainers") not in odd.stderr and files(run) == before
