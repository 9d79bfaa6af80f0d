"""launch/multinode.yaml as two hosts run it: two `accelerate launch` commands with --num_machines 2,
--machine_rank 0 and 1 and --main_process_ip 127.0.0.1, one process each, on a port free now.
The GAN with its defaults (evaluation included; only sizes, steps and sample counts shrunk): the
ranks end with the same weights, one set of files is written, SIGTERM to both launchers checkpoints
the same step and --resume finishes. The LSTM runs the same way through the SLURM script's own srun
line (tests/test_cluster.py). A main address that never answers ends the launch within its timeout."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import rank_facts, ROOT, assert_usage_error, clean_env

MULTINODE = ROOT / "launch" / "multinode.yaml"
RDZV_TIMEOUT = 120   # what a node waits for the main node; the recipe's 300 s, shrunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return clean_env(TORCH_DISTRIBUTED_DEBUG="DETAIL", PALGAN_DEBUG="1",
                     PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def node_cmd(rank: int, port: int, args, rdzv_timeout: int = RDZV_TIMEOUT) -> list[str]:
    """What a user types on host ``rank`` (docs/scaling.md)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTINODE),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--rdzv_conf", f"timeout={rdzv_timeout}", *map(str, args)]


def start_nodes(args, logs: Path) -> list[subprocess.Popen]:
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(node_cmd(rank, port, args), cwd=ROOT, env=env(), stdout=open(logs / f"node{rank}.out", "w"),
                             stderr=open(logs / f"node{rank}.err", "w"), text=True) for rank in (0, 1)]


def wait_nodes(nodes, timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    return [n.wait(timeout=max(1.0, deadline - time.time())) for n in nodes]


def run_nodes(args, logs: Path) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    codes = wait_nodes(start_nodes(args, logs))
    return codes, time.perf_counter() - t0


def read(logs: Path, name: str) -> str:
    return (logs / name).read_text()


def sigterm_both_after(nodes, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert all(n.poll() is None for n in nodes), f"a node ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.1)
    for n in nodes:          # SLURM, or a preemption, signals every node
        n.send_signal(signal.SIGTERM)
    wait_nodes(nodes, timeout=180)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def step_checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def assert_one_writer(run: Path, logs: Path, summary: str) -> None:
    """Rank 0 alone writes and logs: one wandb run per launch, one summary on node 0. (Accelerate's
    print writes once per machine, so node 1's console may show its own copy: at most one.)"""
    assert read(logs, "node0.out").count(summary) == 1, read(logs, "node0.out")[-2000:]
    assert read(logs, "node1.out").count(summary) <= 1, read(logs, "node1.out")[-2000:]
    for name in ("node0.err", "node1.err"):
        assert "[rank0]" not in read(logs, name) and "[rank1]" not in read(logs, name), read(logs, name)[-3000:]


# --- the LSTM ----------------------------------------------------------------------------------

LSTM_ARGS = ["trainers/lstm.py", "--hidden-dim", "16", "--val-size", "300", "--batch-size", "16",
             "--eval-every", "100", "--checkpoint-every", "20"]


# --- the GAN, evaluation included ----------------------------------------------------------------

# The cpu-demo preset (what trainers/gan.py picks on a CPU) with its defaults: evaluation at every stage
# and at the end, EMA samples, wandb offline. Shrunk: width, batch, images, epochs and sample counts.
GAN_DEMO = ["trainers/gan.py", "--preset", "cpu-demo", "--base-channels", "8", "--batch-size", "32",
            "--train-subset", "640", "--epochs", "2", "--stage-samples", "200", "--eval-samples", "400"]


def test_gan_with_defaults_on_two_nodes_sigterm_to_both_then_resume(tmp_path):
    args = [*GAN_DEMO, "--checkpoint-every", "5", "--out-dir", tmp_path, "--run-name", "mn"]
    run = tmp_path / "mn"
    nodes = start_nodes(args, tmp_path / "first")
    sigterm_both_after(nodes, lambda: step_dir(run, 5).is_dir(), "checkpoint at iteration 5")
    assert "stop requested" in read(tmp_path / "first", "node0.out"), read(tmp_path / "first", "node0.err")[-3000:]
    stopped = json.loads((run / "metrics.json").read_text())
    assert not stopped["finished"] and 5 <= stopped["steps"] < 20
    assert step_checkpoints(run)[-1].name == f"step_{stopped['steps']:08d}"

    codes, wall = run_nodes([*args, "--resume"], tmp_path / "resume")
    assert codes == [0, 0], read(tmp_path / "resume", "node0.err")[-3000:] + read(tmp_path / "resume", "node1.err")[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and m["finished"] and m["steps"] == 2 * 10   # 640 images / 2 ranks / batch 32
    assert len(set(rank_facts(run)["weights"])) == 1                      # weights and BN buffers
    assert rank_facts(run)["first_batch"][0] != rank_facts(run)["first_batch"][1]
    assert set(m["stages"]) == {"0", "1", "2"} and all("eval/fid" in s for s in m["stages"].values())
    assert "fid" in m["final"]
    assert_one_writer(run, tmp_path / "resume", "images/s")
    assert len(list(run.glob("wandb/offline-run-*"))) == 2
    for name in ("samples/epoch_000.png", "samples/epoch_002.png", "samples/final.png", "figures/losses.png",
                 "figures/three_panel.png", "figures/class_histogram.png"):
        assert (run / name).is_file(), name
    print(f"GAN (cpu-demo defaults, evaluation on), two nodes x 1 process, resume to the end: {wall:.1f}s")


# --- a main node that never answers ---------------------------------------------------------------

def test_main_address_that_never_answers_ends_within_the_timeout(tmp_path):
    port = free_port()          # nothing listens there
    args = [*LSTM_ARGS, "--steps", "20", "--out-dir", tmp_path, "--run-name", "lonely"]
    t0 = time.perf_counter()
    wrapped = subprocess.run(["bash", "launch/multinode.sh", "1", "127.0.0.1", *map(str, args)], cwd=ROOT,
                             env={**env(), "NUM_MACHINES": "2", "PROCS_PER_MACHINE": "1", "MAIN_PORT": str(port),
                                  "DIST_TIMEOUT": "5"}, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert_usage_error(wrapped, f"the main node 127.0.0.1:{port} did not answer within DIST_TIMEOUT=5s",
                       "start machine rank 0")
    assert 5 <= took < 20, took

    # accelerate launch itself, with the recipe's rendezvous timeout: it ends (after a traceback of
    # its own) once the timeout has passed, instead of torch's 900 s default
    t0 = time.perf_counter()
    raw = subprocess.run(node_cmd(1, port, args, rdzv_timeout=5), cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    took = time.perf_counter() - t0
    assert raw.returncode != 0 and "timed out after 5000ms" in raw.stderr, raw.stderr[-2000:]
    assert took < 5 + 90, took          # the timeout plus the launcher's start on a busy 2-core machine
    assert not (tmp_path / "lonely").exists()
