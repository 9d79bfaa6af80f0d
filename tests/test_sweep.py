"""The Ray Tune sweep end to end: every output read back from disk, interrupt and --resume, ASHA per
grid point against plain ASHA, bad input. One local Ray session (2 CPUs) is shared by the module."""
import csv
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import pytest
from ray.tune.callback import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from conftest import assert_cli_usage_error, tune_reports
from trainers.cli import UsageError, build, flatten, from_saved, override, parse, run_cli
from trainers.lstm import LSTMConfig, train
from wandb_files import read_offline_run
from tune.asha import GroupedASHA
from tune.lstm_sweep import SweepConfig, main, run_sweep
from tune.common import NOT_REPRODUCED
from tune.report import main as report_main

TINY = dict(hidden_dims=(6,), num_samples=1, steps=30, eval_every=10, grace_period=10, batch_size=16,
            val_size=100, horizon_draws=1, max_seq_length=4)   # the extension past the grid stops at T=4
TINY_FLAGS = [x for k, v in TINY.items()
              for x in ("--" + k.replace("_", "-"), *(map(str, v) if isinstance(v, tuple) else [str(v)]))]


def offline_runs(folder: Path) -> list[dict]:
    return [read_offline_run(f) for f in sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))]


def finished_run(folder: Path, timeout: float = 60) -> dict:
    """The one offline wandb run in ``folder`` once its exit record is in (wandb's service writes
    the end of the file shortly after ``finish()`` returns)."""
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while (run := read_offline_run(path))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return run


def table_cells(table: list[str], header: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header line starts with ``header``, by first cell."""
    start = next(k for k, line in enumerate(table) if line.startswith(header))
    rows = {}
    for line in table[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0]] = cells[1:]
    return rows


def test_tiny_sweep_writes_every_output(ray_session, tmp_path, capsys):
    main(["--models", "lstm,rnn", "--seq-lengths", "4", *TINY_FLAGS, "--out-dir", str(tmp_path),
          "--name", "tiny"])
    sweep = tmp_path / "sweeps" / "tiny"

    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert sorted(r["model"] for r in rows) == ["lstm", "rnn"]
    best = {}
    for r in rows:
        reports = tune_reports(sweep, r["trial_id"])
        accs = [rep["val/acc"] for rep in reports]
        # every validation reported once, until the step limit or the second solved validation
        assert [rep["step"] for rep in reports] == list(range(10, 10 * len(reports) + 1, 10))
        if r["status"] == "solved":
            assert min(accs[-2:]) >= 0.999 and r["steps_to_solve"] == str(reports[-2]["step"])
        else:
            assert r["status"] == "completed" and reports[-1]["step"] == 30
        assert float(r["best_val_acc"]) == pytest.approx(max(accs))
        reached = [rep["step"] for rep in reports if rep["val/acc"] >= 0.99]
        assert r["steps_to_99"] == (str(reached[0]) if reached else "")
        space = SweepConfig().search
        assert space.lr_min <= float(r["lr"]) <= space.lr_max and r["hidden_dim"] == "6"
        first_bias = space.forget_biases[0]   # draw 0 takes the first in the list
        assert r["forget_bias"] == (str(first_bias) if r["model"] == "lstm" else "")
        # the trainer's own record of the trial agrees with what Tune received
        run_dir = Path(r["run_dir"])
        assert run_dir.parent == sweep / "trials"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["val/acc"] == pytest.approx(accs[-1]) and metrics["stop_reason"] == r["status"]
        assert metrics["best_val_acc"] == pytest.approx(max(accs))
        trial_run = finished_run(run_dir)
        assert trial_run["exit_code"] == 0 and trial_run["summary"]["stop_reason"] == r["status"]
        assert trial_run["run"]["group"] == "tiny" and trial_run["run"]["name"] == run_dir.name
        assert [h["val/acc"] for h in trial_run["history"] if "val/acc" in h] == pytest.approx(accs)
        best[r["model"]] = max(accs)

    table = (sweep / "table.md").read_text().splitlines()
    per_t = table_cells(table, "| Model | T=4 |")
    assert per_t["LSTM"] == [f"{100 * best['lstm']:.2f}%"]
    assert per_t["Vanilla RNN"] == [f"{100 * best['rnn']:.2f}%"]
    assert per_t["LSTM - RNN"] == [f"{100 * (best['lstm'] - best['rnn']):+.2f} pp"]
    assert per_t["LSTM: draws >= 99%"] == [f"{int(best['lstm'] >= 0.99)}/1"]
    horizons = table_cells(table, "| Model | Horizon")
    for model, label in (("lstm", "LSTM"), ("rnn", "Vanilla RNN")):
        assert horizons[label][0] == ("T=4" if best[model] >= 0.99 else "none")

    image = mpimg.imread(sweep / "figures" / "horizon.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0

    best_json = json.loads((sweep / "best.json").read_text())
    for model in ("lstm", "rnn"):
        entry = best_json["cells"][model]["4"]
        assert entry["best_val_acc"] == pytest.approx(best[model])
        assert set(entry["config"]) == set(flatten(LSTMConfig()))   # every trainer flag, no other
        cfg = from_saved(LSTMConfig, entry["config"])          # a trainer config that can be rerun as it is
        cfg.validate()
        assert (cfg.model.model, cfg.data.seq_length, cfg.model.hidden_dim, cfg.optim.lr) == \
            (model, 4, 6, float(entry["lr"]))
        # ... and the command line that rebuilds it, but for where it writes and how it shows
        rebuilt = parse(LSTMConfig, entry["argv"], prog="", description="")
        keep = set(NOT_REPRODUCED)
        assert keep <= {"out_dir", "run_name", "wandb_group", "wandb_job_type", "progress", "resume"}
        assert {k: v for k, v in flatten(rebuilt).items() if k not in keep} == \
            {k: v for k, v in flatten(cfg).items() if k not in keep}
        assert entry["command"] == " ".join(["python trainers/lstm.py", *entry["argv"]])

    summary = finished_run(sweep)
    assert summary["run"]["name"] == "tiny-summary" and summary["run"]["group"] == "tiny"
    assert summary["exit_code"] == 0 and summary["run"]["job_type"] == "sweep-summary"
    logged = summary["history"][0]
    assert logged["sweep/table/nrows"] == 5 and logged["sweep/trials/nrows"] == 2
    assert logged["sweep/horizons/nrows"] == 2 and logged["sweep/horizon/_type"] == "image-file"
    assert summary["charts"]["sweep/lstm/best_val_acc_vs_T"] == "wandb/lineseries/v0"
    assert summary["charts"]["sweep/rnn/best_val_acc_vs_T"] == "wandb/lineseries/v0"
    assert summary["summary"]["trials/completed"] + summary["summary"]["trials/solved"] == 2
    assert "| LSTM |" in capsys.readouterr().out

    # the report on its own, from the sweep folder alone, writes the same files (but for the wall clock)
    written = {name: (sweep / name).read_text() for name in ("results.csv", "table.md", "best.json")}
    for name in written:
        (sweep / name).unlink()
    run_cli(report_main, [str(sweep), "--no-wandb"])
    assert {name: (sweep / name).read_text() for name in ("results.csv", "best.json")} == \
        {name: written[name] for name in ("results.csv", "best.json")}
    table = (sweep / "table.md").read_text()
    assert table.splitlines()[1:] == written["table.md"].splitlines()[1:] and "| LSTM |" in capsys.readouterr().out
    assert "wall clock" in written["table.md"].splitlines()[0] and "wall clock" not in table.splitlines()[0]
    assert len(offline_runs(sweep)) == 1                                  # --no-wandb: no second summary run


def test_solved_and_culled_trials_end_themselves_with_finished_records(ray_session, tmp_path):
    # T=2 is learnt in a few dozen steps at lr 1e-2; every T=5 trial is still far from 90% at step 20,
    # so the floor culls it there if ASHA has not culled it at step 10.
    sc = build(SweepConfig, models=("lstm",), seq_lengths=(2, 5), hidden_dims=(8,), num_samples=2, steps=100,
               eval_every=10, grace_period=10, batch_size=32, val_size=200, lr_min=9e-3, lr_max=1.1e-2,
               floor_acc=0.9, floor_step=20, horizon_draws=2, horizon_resolution=3, max_seq_length=5,
               out_dir=str(tmp_path), name="ends")
    outcome = run_sweep(sc, verbose=0)
    rows = {(int(r["seq_length"]), r["draw"]): r for r in outcome["rows"]}
    assert len(rows) == 4 and outcome["unfinished"] == 0
    for (t, draw), r in rows.items():
        reports = tune_reports(outcome["sweep_dir"], r["trial_id"])
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        run = finished_run(Path(r["run_dir"]))
        assert run["exit_code"] == 0 and run["summary"]["stop_reason"] == metrics["stop_reason"] == r["status"]
        assert metrics["steps"] == reports[-1]["step"] < sc.trial.steps       # ended at its last report
        assert metrics["best_val_acc"] == pytest.approx(max(rep["val/acc"] for rep in reports))
        if t == 5:   # culled against its grid point's other draw at the first rung, or by the floor
            assert r["status"] in ("culled by ASHA", "culled by ASHA: below 0.9 at step 20")
            assert metrics["steps"] == (20 if "below" in r["status"] else 10)
            assert (outcome["sweep_dir"] / "culled" / r["trial_id"]).read_text().strip() == r["status"]
        elif r["status"] == "solved":
            assert min(rep["val/acc"] for rep in reports[-2:]) >= 0.999
            assert metrics["steps_to_solve"] == r["steps_to_solve"] == reports[-2]["step"]
    assert any(r["status"] == "solved" for (t, _), r in rows.items() if t == 2)
    # each draw of a grid point trains from its own seed, with the next forget bias of the list
    configs = [json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["config"]
               for (t, _), r in sorted(rows.items()) if t == 5]
    biases = list(sc.search.forget_biases)
    assert [c["seed"] for c in configs] == [0, 1] and [c["forget_bias"] for c in configs] == biases[:2]
    assert all(r["forget_bias"] == biases[r["draw"]] for r in rows.values())


def test_grouped_asha_with_a_cull_folder_leaves_its_verdict_and_lets_the_trial_end_itself(tmp_path):
    def trial(tid, acc_model="lstm"):
        return SimpleNamespace(trial_id=tid, config={"model": acc_model, "seq_length": 5})

    kw = dict(metric="val/acc", mode="max", time_attr="step", max_t=100, grace_period=10, reduction_factor=2)
    sched = GroupedASHA(("model", "seq_length"), **kw, floor_acc=0.3, floor_step=20, cull_dir=str(tmp_path))
    plain = GroupedASHA(("model", "seq_length"), **kw, floor_acc=0.3, floor_step=20)
    for s in (sched, plain):
        for tid in ("a", "b", "c"):
            s.on_trial_add(None, trial(tid))
    results = [("c", 10, 0.28), ("a", 10, 0.9), ("b", 10, 0.2), ("c", 20, 0.29), ("a", 20, 0.95)]
    got = {}
    for s in (sched, plain):
        for tid, step, acc in results:
            got[s, tid, step] = s.on_trial_result(None, trial(tid), {"step": step, "val/acc": acc})
    # the plain scheduler stops b (below the rung's cutoff) and c (below the floor at step 20) ...
    assert [got[plain, t, s] for t, s, _ in results] == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE,
                                                          TrialScheduler.STOP, TrialScheduler.STOP,
                                                          TrialScheduler.CONTINUE]
    # ... with a cull folder the same verdicts are written down and the trials continue to read them
    assert all(got[sched, t, s] == TrialScheduler.CONTINUE for t, s, _ in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]
    assert (tmp_path / "b").read_text().strip() == "culled by ASHA"
    assert (tmp_path / "c").read_text().strip() == "culled by ASHA: below 0.3 at step 20"
    assert sched.num_stopped == plain.num_stopped == 2


class Chaos(Callback):
    """Two one-shot faults (flag files keep them from firing again after Tuner.restore, which
    restores the callbacks too): the first trial's worker is SIGKILLed after its step-20 report (a
    crash that FailureConfig retries), and once a trial has finished, the next step-30 report is
    followed by Ctrl-C as Tune sees it (SIGUSR1 takes the same path as SIGINT)."""

    def __init__(self, folder: Path):
        self.kill_flag, self.stop_flag = str(folder / "killed"), str(folder / "interrupted")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result["step"] == 20 and not os.path.exists(self.kill_flag):
            Path(self.kill_flag).touch()
            os.kill(result["pid"], signal.SIGKILL)
        elif (result["step"] == 30 and any(t.status == "TERMINATED" for t in trials)
              and not os.path.exists(self.stop_flag)):
            Path(self.stop_flag).touch()
            os.kill(os.getpid(), signal.SIGUSR1)


def test_crashed_and_interrupted_trials_resume_and_each_runs_once(ray_session, tmp_path):
    # cpus_per_trial=2 on 2 CPUs: one trial at a time, so the faults land at known places.
    sc = build(SweepConfig, models=("lstm",), seq_lengths=(3, 4), **{**TINY, "steps": 40}, cpus_per_trial=2,
               wandb=False, out_dir=str(tmp_path), name="cut")
    first = run_sweep(sc, callbacks=[Chaos(tmp_path)], verbose=0)
    assert (tmp_path / "killed").exists() and (tmp_path / "interrupted").exists()
    assert first["unfinished"] == 1
    sweep = first["sweep_dir"]
    assert not (sweep / "results.csv").exists()            # no table from half a sweep

    with pytest.raises(UsageError, match="--resume"):     # never started over by accident
        run_sweep(sc, verbose=0)
    second = run_sweep(override(sc, resume=True, seq_lengths=(99,)), verbose=0)   # search flags: saved ones
    assert second["unfinished"] == 0 and second["trials"] == 2

    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert sorted(int(r["seq_length"]) for r in rows) == [3, 4]
    attempts = {}
    for r in rows:
        assert r["status"] == "completed" and r["steps"] == "40"
        # each step reported once: no trial was rerun or restarted from scratch
        assert [rep["step"] for rep in tune_reports(sweep, r["trial_id"])] == [10, 20, 30, 40]
        starts = [json.loads(line)["from_step"] for line in (Path(r["run_dir"]) / "attempts.jsonl").open()]
        assert starts == sorted(set(starts))
        attempts[int(r["seq_length"])] = starts
    assert attempts[4][:2] == [0, 20]     # the longest T runs first: killed after its step-20 report, retried from there
    # one start from scratch per trial, plus exactly the two resumes (after the crash, after Ctrl-C);
    # the trial that had finished before Ctrl-C was not run again by --resume
    assert sorted(s for starts in attempts.values() for s in starts) == [0, 0, 20, 30]


def test_asha_stops_trials_only_against_their_own_grid_point():
    def trial(tid, model, t):
        return SimpleNamespace(trial_id=tid, config={"model": model, "seq_length": t})

    kw = dict(metric="val/acc", mode="max", time_attr="step", max_t=100, grace_period=10, reduction_factor=2)
    grouped, plain = GroupedASHA(("model", "seq_length"), **kw), ASHAScheduler(**kw)
    easy = [trial(f"e{k}", "lstm", 5) for k in range(3)]
    hard = trial("h0", "rnn", 30)
    decisions = {}
    for sched in (grouped, plain):
        for t in easy + [hard]:
            sched.on_trial_add(None, t)
        for t, acc in zip(easy + [hard], (0.9, 0.5, 0.99, 0.2)):
            decisions[sched, t.trial_id] = sched.on_trial_result(None, t, {"step": 10, "val/acc": acc})
    # plain ASHA stops the hard task's only trial because LSTMs at T=5 score higher ...
    assert decisions[plain, "h0"] == TrialScheduler.STOP
    # ... per grid point it is compared with nothing, while the easy task still stops its weak trial
    assert decisions[grouped, "h0"] == TrialScheduler.CONTINUE
    expected = [TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.CONTINUE]
    assert [decisions[s, t.trial_id] for s in (grouped, plain) for t in easy] == expected * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = [
    (["--lstm-seq-lengths", ""], "--lstm-seq-lengths is empty"),
    (["--rnn-seq-lengths", "1"], "--rnn-seq-lengths values must be >= 2"),
    (["--forget-biases", "1,x"], "--forget-biases"),
    (["--floor-acc", "1.5"], "--floor-acc"),
    (["--solved-acc", "0"], "--solved-acc"),
    (["--seq-lengths", "5,x"], "--seq-lengths"),
    (["--lr-min", "1e-2", "--lr-max", "1e-4"], "inverted"),
    (["--models", "lstm,gru"], "unknown model 'gru'"),
    (["--hidden-dims", "0"], "--hidden-dims"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--resume"], "--resume: no sweep"),
    (["--address", f"127.0.0.1:{free_port()}"], "no Ray cluster answers there"),
    (["--address", "nowhere"], "--address must be host:port"),
]


@pytest.mark.parametrize("flags,needle", BAD, ids=[" ".join(f[:1]) + f"-{k}" for k, (f, _) in enumerate(BAD)])
def test_bad_input_gives_one_line_and_exit_2(flags, needle, tmp_path, capsys):
    assert_cli_usage_error(main, flags, needle, tmp_path, capsys)


def test_an_out_dir_that_is_a_file_stops_the_sweep_before_ray_starts(tmp_path, capsys, monkeypatch):
    import tune.common as sweep

    monkeypatch.setattr(sweep, "connect_ray", lambda *args: pytest.fail("Ray was started"))
    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--out-dir", str(a_file)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.endswith(f"error: --out-dir {a_file} is a file; pass a folder path"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and a_file.read_text() == "not a folder"


def test_a_restarted_trial_continues_from_its_run_folders_latest_checkpoint(tmp_path):
    """Where a (re)started trial's trainer continues, read from its run folder alone: nowhere once the
    run had ended, else its latest complete checkpoint, else step 0 with what an attempt without a
    checkpoint left cleared, so that the trainer starts afresh there. The reports Tune may have lost
    are rebuilt from the checkpoint's history exactly as the trainer made them."""
    from tune.lstm_sweep import lost_reports, start_step

    cfg = build(LSTMConfig, out_dir=str(tmp_path), run_name="t", steps=40, eval_every=10, checkpoint_every=10,
                log_every=15, hidden_dim=6, batch_size=16, val_size=100, wandb=False, progress=False)
    ckpts = cfg.run_dir / "checkpoints"
    made = []
    train(cfg, on_eval=lambda step, metrics, ckpt: made.append({**metrics, "step": step}))
    assert [m["step"] for m in made] == [10, 20, 30, 40] and "train/loss" not in made[0] and "train/loss" in made[1]
    assert lost_reports(cfg.run_dir, 0) == made and lost_reports(cfg.run_dir, 20) == made[2:]
    assert lost_reports(cfg.run_dir, 40) == []
    assert start_step(cfg.run_dir) is None                          # finished: nothing to redo
    shutil.rmtree(ckpts / "step_00000040")                          # as if killed after step 30's checkpoint ...
    (cfg.run_dir / "metrics.json").write_text(json.dumps({"stop_reason": "failed", "finished": False}))
    (ckpts / ".tmp-step_00000040").mkdir()                          # ... while writing step 40's
    assert lost_reports(cfg.run_dir, 10) == made[1:3]
    assert start_step(cfg.run_dir) == 30 and not (cfg.run_dir / "metrics.json").exists()
    assert train(override(cfg, resume=True))["steps"] == 40
    for step in ("step_00000020", "step_00000030", "step_00000040"):   # no complete checkpoint left
        shutil.rmtree(ckpts / step)
    (cfg.run_dir / "metrics.json").unlink()
    assert lost_reports(cfg.run_dir, 0) == [] and start_step(cfg.run_dir) == 0
    assert not ckpts.exists()                                       # best/ and .tmp-* are gone too
    assert train(cfg)["steps"] == 40                                # a fresh start is not refused


def test_tune_record_is_handed_to_each_starting_trial(tmp_path):
    from tune.record import RecordedSteps, recorded, recorded_step

    callback = RecordedSteps(str(tmp_path / "recorded"), "step")
    assert recorded_step(tmp_path / "recorded", "a") == 0             # nothing written: nothing recorded
    callback.on_trial_start(0, [], SimpleNamespace(trial_id="a", last_result={}))
    callback.on_trial_start(0, [], SimpleNamespace(trial_id="b", last_result={"step": 30, "val/acc": 0.5}))
    assert recorded_step(tmp_path / "recorded", "a") == 0 and recorded_step(tmp_path / "recorded", "b") == 30
    callback.on_trial_start(0, [], SimpleNamespace(trial_id="b", last_result={"step": 40}))   # restarted later
    assert recorded_step(tmp_path / "recorded", "b") == 40
    RecordedSteps(str(tmp_path / "recorded"), "step", keep=("wall_s",)).on_trial_start(
        0, [], SimpleNamespace(trial_id="c", last_result={"step": 8, "wall_s": 2.5, "fid": 9.0}))
    assert recorded(tmp_path / "recorded", "c") == {"step": 8, "wall_s": 2.5}   # with the values it keeps
