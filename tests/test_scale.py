"""Several processes and preemption: 2 CPU processes through `accelerate launch`, and SIGTERM."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, run_script
from trainers.lstm import LSTMConfig, train_batch
from trainers.runtime import fingerprint

TWO_PROCS = ROOT / "launch" / "cpu_2proc.yaml"


def accelerate_launch(config: Path, args, timeout=300, port=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if port:
        cmd += ["--main_process_port", str(port)]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts}


def test_lstm_on_two_cpu_processes(tmp_path):
    args = ["trainers/lstm.py", "--hidden-dim", "16", "--val-size", "300", "--batch-size", "16",
            "--steps", "40", "--eval-every", "20", "--checkpoint-every", "20", "--no-progress",
            "--out-dir", tmp_path, "--run-name", "ddp"]
    proc = accelerate_launch(TWO_PROCS, args, port=29611)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == 40
    # every rank ends with the same weights, bit for bit
    assert len(m["rank_weight_fingerprints"]) == 2 and len(set(m["rank_weight_fingerprints"])) == 1
    # the ranks saw different batches: exactly the (seed, rank, step) streams
    cfg = LSTMConfig(batch_size=16)
    assert m["rank_data_fingerprints"] == [fingerprint(*train_batch(cfg, r, 1)) for r in range(2)]
    assert m["rank_data_fingerprints"][0] != m["rank_data_fingerprints"][1]
    # only rank 0 wrote outputs (Accelerate's save_state adds one RNG file per rank) and one wandb run
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "optimizer.bin", "palgan.json",
                                                     "random_states_0.pkl", "random_states_1.pkl"]
    assert proc.stdout.count("val/acc") == 1                      # the summary line, from rank 0 only

    # resume with two processes and train further
    more = accelerate_launch(TWO_PROCS, [*args[:args.index("--steps")], "--steps", "60",
                                         *args[args.index("--steps") + 2:], "--resume"], port=29612)
    assert more.returncode == 0, more.stderr[-3000:]
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["steps"] == 60 and m2["finished"] and len(set(m2["rank_weight_fingerprints"])) == 1
    assert "resuming ddp from step 40" in more.stdout


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_finishes(tmp_path):
    args = ["trainers/lstm.py", "--hidden-dim", "16", "--val-size", "200", "--batch-size", "16",
            "--steps", "100000", "--eval-every", "50000", "--checkpoint-every", "100", "--no-wandb",
            "--no-progress", "--out-dir", tmp_path, "--run-name", "term"]
    child = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=clean_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "term" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step_00000100").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert "stop requested" in out
    metrics = json.loads((tmp_path / "term" / "metrics.json").read_text())
    stopped_at = metrics["steps"]
    assert not metrics["finished"] and stopped_at >= 100
    assert (ckpts / f"step_{stopped_at:08d}").is_dir()          # a checkpoint at the exact stop step

    finish = [*args[:args.index("--steps") + 1], str(stopped_at + 50), *args[args.index("--steps") + 2:]]
    done = run_script([*finish, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((tmp_path / "term" / "metrics.json").read_text())
    assert final["finished"] and final["steps"] == stopped_at + 50
