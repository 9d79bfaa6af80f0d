import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    """The environment of a child run: offline wandb unless a test says otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update({"WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run_script(args, cwd=ROOT, timeout=300, **env):
    """Run ``python <args>`` as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(proc, *needles):
    """Exit code 2, one line on stderr, no traceback, naming what was wrong."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def no_wandb_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for in-process tests: their sizes are tiny, and on a busy 2-core machine a
    second thread only adds OpenMP barrier waits (bf16 matmuls measured 10-20 ms instead of 0.04 ms)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
