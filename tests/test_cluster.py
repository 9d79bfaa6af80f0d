"""The sweep against a real Ray cluster started as users start one (`ray start --head`, token auth on
because a token exists), each run as the command users type; bad cluster input. One head serves the
module; the test of a head dying mid-sweep starts its own and resumes on the module's."""
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import rank_facts, ROOT, assert_usage_error, clean_env
from trainers.cli import build
from trainers.lstm import LSTMConfig, train_batch
from trainers.debug import fingerprint

SWEEP = ["tune/lstm_sweep.py", "--models", "lstm", "--seq-lengths", "4,5", "--hidden-dims", "6",
         "--forget-biases", "1", "--num-samples", "1", "--batch-size", "16", "--val-size", "100",
         "--eval-every", "10", "--grace-period", "10"]
LOST_LINE = "stopped answering mid-run; start the cluster again and rerun the same command with --resume"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(home: Path, **extra) -> dict:
    """A user's shell on a cluster machine: its own home (and so its own ~/.ray/auth_token), no Ray
    auth variables; the LSTM's compiled step ops keep their usual cache."""
    env = clean_env(HOME=str(home), WANDB_MODE="offline", TORCH_DISTRIBUTED_DEBUG="DETAIL", PALGAN_DEBUG="1",
                    TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                        os.path.expanduser("~/.cache/torch_extensions")),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(key, None)
    env.update(extra)
    return env


def home_with_token(folder: Path, token: str | None) -> Path:
    (folder / ".ray").mkdir(parents=True, exist_ok=True)
    if token is not None:
        (folder / ".ray" / "auth_token").write_text(token + "\n")
    return folder


class Head:
    """`ray start --head --block` on a free port, in its own process group, stopped by that group."""

    def __init__(self, home: Path, num_cpus: int = 2):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")   # short: Ray's socket paths
        self.log = open(Path(self.temp_dir) / "head.log", "w+")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(self.port),
             "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
             "--temp-dir", self.temp_dir],
            cwd=ROOT, env=cluster_env(home), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while "Ray runtime started" not in Path(self.log.name).read_text():
            assert self.proc.poll() is None and time.time() < deadline, Path(self.log.name).read_text()[-3000:]
            time.sleep(0.3)

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)
        self.proc.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The head machine's home, with the token `ray get-auth-token --generate` would have written."""
    return home_with_token(tmp_path_factory.mktemp("home"), secrets.token_hex(32))


@pytest.fixture(scope="module")
def head(home):
    h = Head(home)
    yield h
    h.stop()


def sweep(args, home: Path, timeout=400, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=cluster_env(home, **env),
                          capture_output=True, text=True, timeout=timeout)


def results(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(sweep_dir / "results.csv")))


def test_head_requires_the_token(head, home, tmp_path):
    """The head turned token auth on (a token exists on its machine): a driver without the token
    gets one line naming the fix; so does one whose token differs."""
    no_token = sweep([*SWEEP, "--steps", "20", "--address", head.address, "--out-dir", tmp_path],
                     home_with_token(tmp_path / "empty", None), timeout=120)
    assert_usage_error(no_token, "requires token auth", "no token", "~/.ray/auth_token", "ray get-auth-token")
    wrong = sweep([*SWEEP, "--steps", "20", "--address", head.address, "--out-dir", tmp_path],
                  home_with_token(tmp_path / "other", secrets.token_hex(32)), timeout=120)
    assert_usage_error(wrong, "refused the auth token from ~/.ray/auth_token", "ray get-auth-token")
    disabled = sweep([*SWEEP, "--steps", "20", "--address", head.address, "--out-dir", tmp_path], home,
                     timeout=120, RAY_AUTH_MODE="disabled")
    assert_usage_error(disabled, "requires token auth but RAY_AUTH_MODE=disabled")
    assert not (tmp_path / "sweeps").exists()


def test_gpus_per_trial_above_the_cluster(head, home, tmp_path):
    proc = sweep([*SWEEP, "--steps", "20", "--gpus-per-trial", "1", "--address", head.address,
                  "--out-dir", tmp_path], home, timeout=120)
    assert_usage_error(proc, "--gpus-per-trial 1", "the Ray cluster has 0 GPUs")


@pytest.mark.parametrize("address, env, needles", [
    ("ray://127.0.0.1:{port}", {}, ("no Ray Client server answers there", "--ray-client-server-port")),
    ("{head}", {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, ("RAY_AUTH_TOKEN_PATH=/nonexistent/token",
                                                               "missing, unreadable or empty")),
])
def test_bad_cluster_address(head, home, tmp_path, address, env, needles):
    address = address.format(port=free_port(), head=head.address)
    proc = sweep([*SWEEP, "--steps", "20", "--address", address, "--out-dir", tmp_path], home, timeout=120, **env)
    assert_usage_error(proc, *needles)


def test_sweep_through_address_survives_its_head_dying_and_resumes_on_a_new_head(head, home, tmp_path):
    """A 2-trial sweep joins a token head through --address; the head dies (its whole process group) once
    a trial has checkpointed: one line, exit code 1. The same command with --resume and the module's head
    as the new --address finishes the sweep, each trial from its checkpoint; the results are read back."""
    args = [*SWEEP, "--steps", "80", "--out-dir", tmp_path, "--name", "lost"]
    dying = Head(home)
    try:
        driver = subprocess.Popen([sys.executable, *args, "--address", dying.address], cwd=ROOT,
                                  env=cluster_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        trials = tmp_path / "sweeps" / "lost" / "trials"
        deadline = time.time() + 240
        while not list(trials.glob("*/checkpoints/step_*")) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        dying.kill()                                     # the whole head: GCS, raylet, the trial workers
        killed = time.time()
        out, err = driver.communicate(timeout=60)
        gone_after = time.time() - killed
    finally:
        dying.stop()
    assert f"joined the Ray cluster at {dying.address}" in out and "auth: token from ~/.ray/auth_token" in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert driver.returncode == 1, err[-3000:]
    assert lines[-1].startswith("lstm_sweep.py: error: the Ray head at " + dying.address) and LOST_LINE in lines[-1]
    assert sum(LOST_LINE in line for line in lines) == 1 and "Traceback" not in err
    assert gone_after < 20, gone_after

    t0 = time.perf_counter()
    resumed = sweep([*args, "--address", head.address, "--resume"], home)
    wall = time.perf_counter() - t0
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "lost"
    rows = results(sweep_dir)
    assert sorted(int(r["seq_length"]) for r in rows) == [4, 5]
    for r in rows:
        # every trial ran to its end (all 80 steps, or solved on the way: T=4 is easy), and the trainer's
        # own record, written by a worker of the new head, agrees with what Tune received
        assert r["status"] == "completed" and int(r["steps"]) == 80 or r["status"] == "solved", \
            (rows, resumed.stdout[-4000:], resumed.stderr[-4000:])
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert metrics["steps"] == int(r["steps"]) and metrics["val/acc"] == pytest.approx(float(r["val_acc"]))
    starts = {r["trial_id"]: [json.loads(line)["from_step"] for line in
                              (Path(r["run_dir"]) / "attempts.jsonl").read_text().splitlines()] for r in rows}
    assert all(s[0] == 0 for s in starts.values()), starts
    assert any(len(s) >= 2 and max(s[1:]) > 0 for s in starts.values()), starts   # from a checkpoint, not 0
    assert (sweep_dir / "table.md").is_file() and (sweep_dir / "best.json").is_file()
    print(f"--resume of the 2-trial sweep through --address on the new head: {wall:.1f}s")


# --- the SLURM script, without SLURM ------------------------------------------------------------

SBATCH = ROOT / "launch" / "slurm_multinode.sbatch"
ALLOCATION = {"SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
              "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "palgan"}


def dry_run(tmp_path: Path, *args) -> list[list[str]]:
    """The accelerate command of each node, as the script's DRY_RUN prints it (no srun on PATH)."""
    proc = subprocess.run(["bash", str(SBATCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**cluster_env(tmp_path), **ALLOCATION, "DRY_RUN": "1", "OUT_DIR": str(tmp_path),
                               "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["node gpu-a", "node gpu-b"], proc.stdout
    return [line.split(": ", 2)[2].split() for line in lines]


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_slurm_dry_run_two_nodes_of_four_gpus(tmp_path):
    commands = dry_run(tmp_path, "trainers/gan.py")
    for rank, cmd in enumerate(commands):
        assert cmd[:4] == ["accelerate", "launch", "--config_file", "launch/multinode.yaml"]
        assert flag(cmd, "--num_machines") == "2" and flag(cmd, "--num_processes") == "8"   # 2 nodes x 4 GPUs
        assert flag(cmd, "--machine_rank") == str(rank)
        assert flag(cmd, "--main_process_ip") == "gpu-a" and flag(cmd, "--main_process_port") == "29500"
        assert flag(cmd, "--rdzv_conf") == "timeout=300" and flag(cmd, "--dist-timeout") == "300"
        trainer = cmd[cmd.index("trainers/gan.py"):]
        # --resume auto: a first start trains from scratch, a requeued one continues from its checkpoint
        assert trainer == ["trainers/gan.py", "--dist-timeout", "300", "--out-dir", str(tmp_path),
                           "--run-name", "slurm-palgan-42", "--resume", "auto"]
    for rank, cmd in enumerate(dry_run(tmp_path, "trainers/lstm.py", "--seq-length", "20")):
        assert flag(cmd, "--machine_rank") == str(rank)
        assert cmd[cmd.index("trainers/lstm.py"):] == [
            "trainers/lstm.py", "--dist-timeout", "300", "--out-dir", str(tmp_path), "--run-name", "slurm-palgan-42",
            "--resume", "auto", "--seq-length", "20"]


STUB_SRUN = """#!/usr/bin/env bash
# srun for one machine: the command once per node of the allocation, SLURM_NODEID set, signals forwarded
echo "$* SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-} TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-}" \
  >> "$STUB_LOGS/srun_args"
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$STUB_LOGS/node$node.out" 2> "$STUB_LOGS/node$node.err" &
  pids+=($!)
done
trap 'echo "srun: forwarding SIGTERM" >> "$STUB_LOGS/calls"; kill -TERM "${pids[@]}"' TERM
code=0
for pid in "${pids[@]}"; do
  while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2> /dev/null || break; done
  [ "$rc" -eq 0 ] || code=$rc
done
exit $code
"""
STUB_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<< "$3" ;;
  *) echo "scontrol $*" >> "$STUB_LOGS/calls" ;;
esac
"""


def slurm_stubs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def test_slurm_sigterm_reaches_the_trainers_then_the_requeued_job_resumes(tmp_path):
    """Two "nodes" on this machine through the script's own srun line (stub srun/scontrol on PATH): each
    runs launch/multinode.sh, i.e. accelerate launch with its machine rank, one process each. SIGTERM to
    the batch shell reaches both trainers, which stop after the same step and checkpoint; the job requeues
    itself, and its next start resumes on both nodes and finishes: one set of files, the same weights."""
    stubs, logs = slurm_stubs(tmp_path / "bin"), tmp_path / "logs"
    logs.mkdir()
    job = {**cluster_env(tmp_path), "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "1", "SLURM_CPUS_PER_TASK": "3", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "palgan", "STUB_LOGS": str(logs),
           "MAIN_PORT": str(free_port()), "DIST_TIMEOUT": "120", "OUT_DIR": str(tmp_path / "runs")}
    job["PATH"] = f"{stubs}:{job['PATH']}"
    args = ["bash", str(SBATCH), "trainers/lstm.py", "--hidden-dim", "16", "--val-size", "300", "--batch-size", "16",
            "--eval-every", "100", "--checkpoint-every", "20", "--steps", "300"]
    run = tmp_path / "runs" / "slurm-palgan-7"
    batch = subprocess.Popen(args, cwd=ROOT, env=job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000020").is_dir():
        assert batch.poll() is None and time.time() < deadline, (batch.communicate(), (logs / "node0.err").read_text())
        time.sleep(0.1)
    batch.send_signal(signal.SIGTERM)            # --signal=B:TERM: SLURM signals the batch shell only
    out, err = batch.communicate(timeout=180)
    assert batch.returncode == 0, err[-3000:]
    assert "SIGTERM: asking the trainers to checkpoint, then requeueing job 7" in out
    calls = (logs / "calls").read_text().splitlines()
    assert calls == ["srun: forwarding SIGTERM", "scontrol requeue 7"], calls
    srun = (logs / "srun_args").read_text().split()   # each task its cores; time for the checkpoint on SIGTERM
    assert "--cpus-per-task=3" in srun and "SRUN_CPUS_PER_TASK=3" in srun, srun
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=100" in srun, srun
    for node in (0, 1):
        assert "[rank" not in (logs / f"node{node}.err").read_text(), (logs / f"node{node}.err").read_text()[-3000:]
    assert "stop requested" in (logs / "node0.out").read_text()
    stopped = json.loads((run / "metrics.json").read_text())
    assert not stopped["finished"] and 20 <= stopped["steps"] < 300
    last = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
    assert last.name == f"step_{stopped['steps']:08d}"               # the same stop step on both nodes
    assert sorted(p.name for p in last.iterdir()) == ["model.safetensors", "optimizer.bin", "palgan.json",
                                                     "random_states_0.pkl", "random_states_1.pkl"]

    t0 = time.perf_counter()
    again = subprocess.run(args, cwd=ROOT, env=job, capture_output=True, text=True, timeout=400)   # the requeued job
    wall = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-3000:] + (logs / "node0.err").read_text()[-3000:]
    assert f"resuming slurm-palgan-7 from step {stopped['steps']}" in (logs / "node0.out").read_text()
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and m["finished"] and m["steps"] == 300
    assert len(rank_facts(run)["weights"]) == 2 and len(set(rank_facts(run)["weights"])) == 1
    cfg = build(LSTMConfig, batch_size=16)      # each node's rank drew its own (seed, rank, step) stream
    assert rank_facts(run)["first_batch"] == [fingerprint(*train_batch(cfg, r, 1)) for r in range(2)]
    assert rank_facts(run)["first_batch"][0] != rank_facts(run)["first_batch"][1]
    assert len(list(run.glob("wandb/offline-run-*"))) == 2        # one per start of the job, rank 0's
    assert (logs / "node0.out").read_text().count("val/acc") == 1
    print(f"SLURM job on two stub nodes, the requeued start to step 300: {wall:.1f}s")


def test_a_trial_given_no_gpu_sees_none_and_one_given_gpus_keeps_rays_choice():
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a 0-GPU worker; the trial then hides every GPU,
    so its trainer's Accelerator picks the CPU (trainers/runtime.make_accelerator: cpu=not cuda)."""
    from tune.cluster import hide_unassigned_gpus
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    hide_unassigned_gpus([], env)
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    env = {"CUDA_VISIBLE_DEVICES": "2"}           # a --gpus-per-trial 0.25 trial: Ray set its GPU
    hide_unassigned_gpus(["2"], env)
    assert env == {"CUDA_VISIBLE_DEVICES": "2"}
    probe = "import os, torch; os.environ['CUDA_VISIBLE_DEVICES'] = ''; print(torch.cuda.is_available())"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
