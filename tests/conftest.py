import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Variables that would point a test run at a real wandb account or a user's Accelerate setup.
# NETRC is set to an empty file rather than removed: without it, wandb and the trainers read ~/.netrc.
_CLEARED_PREFIXES = ("WANDB_", "ACCELERATE_")


# pytest-xdist (-n 2 in pyproject.toml) runs one file's tests on one worker, so a file's fixtures are
# built once; the files that start Ray share one worker, so there is one local Ray at a time.
RAY_FILES = {"test_cluster", "test_sweep", "test_sweep_cli", "test_gan_sweep", "test_sweep_horizon"}


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.module.__name__ if item.module else item.nodeid
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))


def clean_env(**extra) -> dict:
    """The environment of a child run: no wandb credentials (so wandb runs offline), no WANDB_*,
    ACCELERATE_* or RAY_ADDRESS settings from the caller's shell, unless a test passes them in ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED_PREFIXES) and k != "RAY_ADDRESS"}
    env.update({"WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                "NETRC": os.devnull})
    env.update(extra)
    return env


def run_script(args, cwd=ROOT, timeout=300, **env):
    """Run ``python <args>`` as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def rank_facts(run_dir: Path) -> dict:
    """``{name: [rank 0's value, rank 1's, ...]}``: what a run launched with PALGAN_DEBUG=1 gathered
    from every rank at its end (hashes of each rank's weights and first batch, images scored, ...)."""
    return json.loads((Path(run_dir) / "debug.json").read_text())


def assert_usage_error(proc, *needles):
    """Exit code 2, one line on stderr, no traceback, naming what was wrong."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def free_port() -> int:
    """A TCP port that is free now. Call it right before the launch that uses it (not at collection
    time, not in a module constant), so the window in which another program can take it stays short."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(child: subprocess.Popen, condition: Callable[[], bool], what: str, timeout: float = 120,
             every: float = 0.02) -> None:
    """Poll until ``condition()`` holds while ``child`` runs. Fails the test, naming ``what``, if the
    child exits first or the timeout passes (the child is then killed, so no process is left behind)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if child.poll() is not None:
            out = _tail(child)
            pytest.fail(f"the run exited (code {child.returncode}) before {what}{out}")
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{_tail(child)}")
        time.sleep(every)


def signal_when(child: subprocess.Popen, condition: Callable[[], bool], sig: int, what: str,
                timeout: float = 120) -> None:
    """Send ``sig`` to ``child`` once ``condition()`` holds (see ``wait_for``), and only then.
    A run that finished, or failed, before the condition held fails the test with that reason."""
    wait_for(child, condition, what, timeout)
    if child.poll() is not None:   # exited between the check and the signal
        pytest.fail(f"the run exited (code {child.returncode}) right after {what}, before "
                    f"{signal.Signals(sig).name} could be sent{_tail(child)}")
    child.send_signal(sig)


def _tail(child: subprocess.Popen) -> str:
    """The last lines of a finished child's stderr, when it was piped."""
    if child.poll() is None or child.stderr is None or child.stderr.closed:
        return ""
    try:
        err = child.stderr.read()
    except (OSError, ValueError):
        return ""
    if isinstance(err, bytes):
        err = err.decode(errors="replace")
    return f"; its stderr ends:\n{err[-2000:]}" if err else ""


def _clear_tracking_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(_CLEARED_PREFIXES):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", os.devnull)


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    """In-process tests get offline wandb as child runs do: no credentials from NETRC, ~/.netrc or
    WANDB_API_KEY, and no WANDB_* or ACCELERATE_* settings from the caller's shell (the trainers read
    ACCELERATE_MIXED_PRECISION)."""
    _clear_tracking_env(monkeypatch)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for in-process tests: their sizes are tiny, and on a busy 2-core machine a
    second thread only adds OpenMP barrier waits (bf16 matmuls measured 10-20 ms instead of 0.04 ms)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes the launcher started (read from their environment)."""
    ranks = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(child)
    return ranks


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (2 CPUs) for a module's sweeps, with offline wandb and one thread per worker."""
    import ray

    with pytest.MonkeyPatch.context() as mp:   # inherited by the Ray workers started below
        _clear_tracking_env(mp)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("OMP_NUM_THREADS", "1")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 1024 ** 2)
        yield
        ray.shutdown()


def tune_reports(sweep_dir: Path, trial_id: str) -> list[dict]:
    """Ray Tune's own record of one trial of the sweep at ``sweep_dir``: every line of its result.json."""
    (trial_dir,) = (sweep_dir / "tune").glob(f"*-{trial_id}")
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


def assert_cli_usage_error(main, argv: list[str], needle: str, out_dir: Path, capsys) -> None:
    """``main`` run as its command line (run_cli) with ``argv`` and ``--out-dir out_dir --no-wandb``:
    exit 2 with one line on stderr that holds ``needle``, no traceback, nothing written."""
    from trainers.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*argv, "--out-dir", str(out_dir), "--no-wandb"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err and not any(Path(out_dir).iterdir())      # nothing written
