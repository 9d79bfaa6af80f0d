"""`python tune/lstm_sweep.py [--quick]` as users run it: the script's own Ray (started and shut down
by it), ASHA culling trials among the draws of one grid point, Ctrl-C -> exit code 130, and
`python tune/sweep_cost.py --quick`. Sizes are shrunk by flags."""
import csv
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from conftest import ROOT, clean_env, signal_when
from tune.lstm_sweep import QUICK

SHRINK = ["--seq-lengths", "4", "--max-seq-length", "4", "--hidden-dims", "6", "--batch-size", "16", "--val-size", "100",
          "--eval-every", "10", "--grace-period", "10", "--floor-acc", "0"]


def sweep_script(args, tmp_path: Path, quick: bool = True) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tune/lstm_sweep.py", *(["--quick"] if quick else []), *SHRINK,
                             *map(str, args),
                             "--out-dir", str(tmp_path)], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The child's output once it exits; killed (with its Ray) if it outlives ``timeout``."""
    try:
        return child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGINT)       # the script's own way out: Tune stops, Ray shuts down
        try:
            child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        raise


def ray_processes_of(pid: int) -> list[str]:
    """Command lines of live processes that belong to the Ray session started by process ``pid``
    (Ray names the session folder session_<date>_<pid> and passes it to every process it starts)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"_{pid} " in cmdline.replace("/", " ").replace(",", " ") and "session_" in cmdline:
                found.append(cmdline[:200])
    return found


def test_sweep_script_starts_and_stops_its_own_ray_and_asha_culls_within_a_grid_point(tmp_path):
    # One trial at a time (--cpus-per-trial 2 on a 2-CPU Ray), so the order in which results reach
    # the scheduler is the trials' order, and Ray's own ASHAScheduler can replay it. A wide lr range
    # spreads the 3 draws (seed 0 draws them from high to low lr), so the later draws fall behind.
    # Every flag is given (no --quick, which replaces flags left at their defaults).
    child = sweep_script(["--models", "lstm", "--seq-lengths", "3", "--num-samples", "3", "--forget-biases", "3",
                          "--steps", "30", "--val-size", "500", "--lr-min", "1e-3", "--lr-max", "1e-1",
                          "--reduction-factor", "2", "--num-cpus", "2", "--cpus-per-trial", "2", "--name", "q",
                          "--max-seq-length", "3"],   # the extension past the grid ends at its T
                         tmp_path, quick=False)
    out, err = finish(child, timeout=500)
    assert child.returncode == 0, err[-3000:]
    assert "| LSTM |" in out                                        # the table, printed by __main__
    assert not ray_processes_of(child.pid), "the script left its Ray running"
    sweep = tmp_path / "sweeps" / "q"
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert len(rows) == 3 and {(r["model"], r["seq_length"]) for r in rows} == {("lstm", "3")}

    # Tune's record of each trial (result.json); run one after another, in the order of their draws
    trials = sorted(rows, key=lambda r: int(r["draw"]))
    reported = {}
    for r in trials:
        (trial_dir,) = (sweep / "tune").glob(f"*-{r['trial_id']}")
        reported[r["trial_id"]] = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    # Ray's own ASHAScheduler, fed the same results in the same order, says which trials to stop
    asha = ASHAScheduler(metric="val/acc", mode="max", time_attr="step", max_t=30, grace_period=10,
                         reduction_factor=2, stop_last_trials=False)
    stub = {r["trial_id"]: SimpleNamespace(trial_id=r["trial_id"], config={}) for r in trials}
    for r in trials:
        asha.on_trial_add(None, stub[r["trial_id"]])
    stopped = {}
    for r in trials:
        for rep in reported[r["trial_id"]]:
            if asha.on_trial_result(None, stub[r["trial_id"]], rep) == TrialScheduler.STOP:
                stopped[r["trial_id"]] = rep["step"]
                break
    seen = [(r["draw"], rep["step"], rep["val/acc"]) for r in trials for rep in reported[r["trial_id"]]]
    assert stopped, f"ASHA stops no trial of these results: {seen}"
    for r in trials:
        tid = r["trial_id"]
        if tid in stopped:   # culled where Ray's ASHA stops it: its last report, and the trainer ended there
            assert r["status"].startswith("culled by ASHA") and reported[tid][-1]["step"] == stopped[tid], seen
            assert (sweep / "culled" / tid).exists()
            metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
            assert metrics["steps"] == stopped[tid] and metrics["stop_reason"] == r["status"]
        else:
            assert r["status"] in ("completed", "solved"), (r["status"], seen)


def test_ctrl_c_stops_the_quick_sweep_with_exit_code_130_and_a_line_on_resuming(tmp_path):
    child = sweep_script(["--models", "lstm", "--num-samples", "2", "--steps", "100000", "--num-cpus", "2",
                          "--name", "cut"], tmp_path)
    trials = tmp_path / "sweeps" / "cut" / "trials"

    def first_report() -> bool:   # a trial's first checkpoint: its report to Tune follows at once
        return any(trials.glob("*/checkpoints/step_*"))

    signal_when(child, first_report, signal.SIGINT, "the first trial's first report to Tune", timeout=300)
    out, err = finish(child, timeout=300)
    assert child.returncode == 130, (child.returncode, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("lstm_sweep:")]
    assert len(lines) == 1 and "unfinished" in lines[0] and "--resume" in lines[0], err[-3000:]
    driver = [line for line in err.splitlines() if not re.sub(r"\x1b\[[0-9;]*m", "", line).startswith("(")]
    assert not any("Traceback" in line for line in driver), err[-3000:]   # "(run_trial pid=...)": a trial's
    assert not ray_processes_of(child.pid), "the script left its Ray running after Ctrl-C"
    assert not (tmp_path / "sweeps" / "cut" / "results.csv").exists()   # no table from a partial sweep


def test_sweep_cost_script_runs_as_a_script():
    proc = subprocess.run([sys.executable, "tune/sweep_cost.py", "--quick", "--models", "lstm", "--seq-lengths", "4",
                           "--hidden-dims", "6", "--batch-size", "16", "--val-size", "100", "--num-cpus", "2"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"^{QUICK['num_samples']} trials x {QUICK['steps']} steps: [\d.]+ trial-hours", proc.stdout, re.M)


def test_sweep_cost_adds_up_its_own_timings_per_grid_point(capsys):
    from tune.sweep_cost import main as cost_main

    result = cost_main(["--quick", "--seq-lengths", "4,6", "--hidden-dims", "6,8", "--batch-size", "16",
                        "--num-samples", "2", "--num-cpus", "2"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(lstm|rnn)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    draws = int(re.search(r"^(\d+) trials x", out, re.M).group(1)) // 4    # per grid point (4 of them)
    assert sorted((m, int(t), int(h)) for m, t, h, *_ in rows) == \
        [(m, t, h) for m in ("lstm", "rnn") for t in (4, 6) for h in (6, 8)]
    steps, evals = QUICK["steps"], -(-QUICK["steps"] // QUICK["eval_every"])   # the quick preset's trials
    for (model, t), seconds in result["per_cell_s"].items():
        # draws x the mean over hidden_dim of steps x (printed ms/step) + validations x (printed s/eval)
        mine = [steps * float(ms) / 1000 + evals * float(ev) for m, tt, _, ms, ev, _ in rows if (m, int(tt)) == (model, t)]
        slack = draws * (steps * 0.005e-3 + evals * 0.0005)   # the printed figures' rounding
        assert seconds == pytest.approx(draws * sum(mine) / len(mine), abs=slack), (model, t)
    assert result["trial_hours"] == pytest.approx(sum(result["per_cell_s"].values()) / 3600)
