"""The DCGAN sweep end to end on a tiny problem: one ASHA sweep interrupted and resumed (shared by the
ASHA, budget and resume checks), a PBT sweep whose exploitation is checked against a plain resume of
the copied checkpoint, bad input. Shares the module-wide local Ray session of the "ray" xdist group
(tests/conftest.py)."""
import contextlib
import csv
import io
import json
import os
import shutil
import signal
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
from ray.tune.callback import Callback

from conftest import assert_cli_usage_error, tune_reports
from trainers.checkpoint import checkpoint_name, list_checkpoints, read_meta
from trainers.cli import UsageError, build, override
from trainers.gan import parse_train_args, train
from tune.common import UNFINISHED
from tune.gan_sweep import GanSweepConfig, main, parse_sweep, preset_point, run_sweep, trial_config

# 512 images, width 8, 200 scored samples: an epoch and its stage in about a second
TINY = dict(train_subset=512, widths=(8,), batch_sizes=(32, 64), stage_samples=200, time_budget_s=5.0,
            grace_period_s=2.0, perturbation_interval_s=2.0, num_samples=3, wandb=False)


class StopAfterFirstEnd(Callback):
    """Ctrl-C (SIGUSR1, as Tune takes it) once one trial has ended and Tune has recorded another's
    checkpoint (which that trial then resumes from)."""

    def __init__(self, flag: Path):
        self.flag = flag

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if any(t.status == "TERMINATED" and t is not trial for t in trials) and not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """One tiny ASHA sweep of 3 trials on 2 slots, Ctrl-C'd once a trial has ended, then resumed
    through the command line: ``(first outcome, resumed outcome, its stdout, sweep folder)``."""
    out = tmp_path_factory.mktemp("gan-asha")
    argv = ["--out-dir", str(out), "--name", "asha", *flags(TINY)]
    sc = parse_sweep(argv, prog="test", description="")
    first = run_sweep(sc, callbacks=[StopAfterFirstEnd(out / "interrupted")], verbose=0)
    assert (out / "interrupted").exists()
    first["report_written"] = (out / "sweeps" / "asha" / "results.csv").exists()   # not before every trial ends
    with pytest.raises(UsageError, match="--resume"):   # the same sweep again without --resume
        run_sweep(sc, verbose=0)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        second = main([*argv, "--resume"])
    return first, second, stdout.getvalue(), out / "sweeps" / "asha"


def tune_checkpoints(sweep_dir: Path, trial_id: str) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint Tune keeps of the trial's reports, oldest first (under PBT
    a step can appear twice: once from the trial's own weights, once after copying another's)."""
    (trial_dir,) = (sweep_dir / "tune").glob(f"*-{trial_id}")
    return [(read_meta(c)["step"], c) for c in sorted(trial_dir.glob("checkpoint_*"))]


def trained_from(sweep_dir: Path, trial_id: str, attempt: dict) -> list[tuple[int, Path]]:
    """The trial's checkpoints that the attempt trained (past its start, with its learning rates)."""
    return [(s, c) for s, c in tune_checkpoints(sweep_dir, trial_id) if s > attempt["from_step"]
            and (read_meta(c)["config"]["lr"], read_meta(c)["config"]["lr_d"]) == (attempt["lr"], attempt["lr_d"])]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f.name + k: v for f in sorted(ckpt.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


def test_tiny_asha_sweep_writes_every_output_and_each_trial_ends_itself(asha_sweep, tmp_path):
    _, outcome, stdout, sweep = asha_sweep
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert outcome["trials"] == len(rows) == 3 and outcome["errors"] == 0 and outcome["unfinished"] == 0
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())   # the trainer's finished record
        assert metrics["stop_reason"] == r["status"] and r["status"].split(":")[0] in ("time budget", "culled by ASHA")
        reports = tune_reports(sweep, r["trial_id"])
        assert [rep["epoch"] for rep in reports] == list(range(1, len(reports) + 1)) == \
            list(range(1, int(r["stages"]) + 1))
        # the budget rule: stop when the next epoch, as long as the last, would end at or past the budget
        assert all(0 < rep["epoch_s"] <= rep["wall_s"] and rep["next_end_s"] == rep["wall_s"] + rep["epoch_s"]
                   for rep in reports)
        if len((Path(r["run_dir"]) / "attempts.jsonl").read_text().splitlines()) == 1:   # one run: its epochs
            walls = [0.0] + [rep["wall_s"] for rep in reports]
            assert [rep["epoch_s"] for rep in reports] == pytest.approx([b - a for a, b in zip(walls, walls[1:])])
        ends = [rep["next_end_s"] >= 5.0 for rep in reports]
        assert not any(ends[:-1]) and (ends[-1] or r["status"] != "time budget")
        for rep in reports:   # the reported ratio is the stage FID the trainer recorded over the floor
            stage = metrics["stages"][str(rep["epoch"])]
            assert rep["fid"] == pytest.approx(stage["eval/fid"]) and rep["fid_ratio"] == pytest.approx(
                stage["eval/fid"] / rep["floor_fid"])
        assert float(r["best_fid_ratio"]) == pytest.approx(min(rep["fid_ratio"] for rep in reports))
    best = json.loads((sweep / "best.json").read_text())
    top = min(rows, key=lambda r: float(r["best_fid_ratio"]))
    assert best["trial_id"] == top["trial_id"] and best["scheduler"] == "asha"
    assert best["command"].startswith("accelerate launch trainers/gan.py --preset cpu-demo")
    assert f"--epochs {top['best_epoch']}" in best["command"] and "--train-subset 512" in best["command"]
    table = (sweep / "table.md").read_text()
    assert all(r["trial_id"] in table for r in rows) and "time budget" in table
    image = mpimg.imread(sweep / "figures" / "fid_vs_time.png")
    assert image.shape[0] > 300 and image.std() > 0.01
    assert "3 trials (0 failed)" in stdout
    # the result is a configuration: best.json's flags, trained from scratch, reach the trial's best
    # stage FID exactly (training on the CPU is deterministic). The run is ended at that stage, as the
    # trial was, not at its --epochs (the end-of-training evaluation is not what is compared).
    cfg = override(parse_train_args([*best["argv"], "--out-dir", str(tmp_path / "again"), "--no-wandb"]),
                   progress=False, epochs=best["best_epoch"] + 1)
    retrained = train(cfg, on_stage=lambda step, numbers, ckpt: "seen" if numbers["epoch"] == best["best_epoch"]
                      else None)
    assert retrained["stages"][str(best["best_epoch"])]["eval/fid"] == pytest.approx(best["best_fid"], rel=1e-6)


def test_an_interrupted_sweep_resumes_and_runs_each_trial_once(asha_sweep):
    first, second, _, sweep = asha_sweep
    assert first["unfinished"] >= 1 and not first["report_written"]
    assert second["unfinished"] == 0 and second["trials"] == 3
    ended_first = {r["trial_id"] for r in first["rows"] if r["status"] not in (*UNFINISHED, "failed")}
    # the unfinished trials of which Tune's saved state held a checkpoint when the sweep stopped
    held = {r["trial_id"] for r in first["rows"] if r["status"] in UNFINISHED and r["best_checkpoint"]}
    for r in second["rows"]:
        epochs = [rep["epoch"] for rep in tune_reports(sweep, r["trial_id"])]
        assert epochs == list(range(1, len(epochs) + 1))          # every stage reported once
        starts = [json.loads(line)["from_step"] for line in (Path(r["run_dir"]) / "attempts.jsonl").open()]
        assert starts == sorted(starts)   # never back to an earlier step
        if r["trial_id"] in held:   # continued from that checkpoint
            assert len(starts) == 2 and starts[-1] > 0
        if r["trial_id"] in ended_first:   # a trial that had ended was not run again
            assert starts == [0]
    assert ended_first


def test_a_trial_restored_from_a_checkpoint_that_used_the_budget_ends_at_once(asha_sweep, tmp_path):
    """What a PBT trial does when it copies such a checkpoint (a trial that ended at the budget): the
    trainer writes its record of the run up to it, ended by the budget, without another iteration."""
    _, outcome, _, sweep = asha_sweep
    r = next(r for r in outcome["rows"] if r["status"] == "time budget")
    step, ckpt = tune_checkpoints(sweep, r["trial_id"])[-1]
    cfg = override(trial_config(read_meta(ckpt)["config"], "again"), out_dir=str(tmp_path), resume=True)
    shutil.copytree(ckpt, cfg.run_dir / "checkpoints" / checkpoint_name(step))
    metrics = train(cfg, stop_reason="time budget")
    assert metrics["stop_reason"] == "time budget" and metrics["steps"] == step and not metrics["finished"]
    assert metrics["stages"] == read_meta(ckpt)["extra"]["record"]["stages"]
    assert json.loads((cfg.run_dir / "metrics.json").read_text())["steps"] == step
    assert list_checkpoints(cfg.run_dir / "checkpoints") == [cfg.run_dir / "checkpoints" / checkpoint_name(step)]


def test_tiny_pbt_sweep_exploits_by_restoring_the_source_checkpoint(ray_session, tmp_path):
    sc = build(GanSweepConfig, out_dir=str(tmp_path), name="pbt", scheduler="pbt",
               **{**TINY, "train_subset": 256, "stage_samples": 100, "time_budget_s": 8.0, "num_samples": 2,
                  "batch_sizes": (32,)})   # 8 iterations an epoch: enough reports in 8 s for PBT to exploit
    outcome = run_sweep(sc, verbose=0)
    sweep = outcome["sweep_dir"]
    assert outcome["errors"] == 0 and outcome["trials"] == 2
    rows = {r["trial_id"]: r for r in outcome["rows"]}
    for r in rows.values():   # each run ends itself at the budget with a finished record
        assert json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["stop_reason"] == "time budget"
        reports = tune_reports(sweep, r["trial_id"])   # no report past the budget
        assert reports and not any(rep["wall_s"] + rep["epoch_s"] >= 8.0 for rep in reports[:-1])
    # exploitations the trial trained on from (one that copied a checkpoint which had used the budget ends at once)
    exploits = [(tid, a, min(later)) for tid, r in rows.items() for a in r["attempts"]
                if a["source"] not in (None, a["run"]) and (later := trained_from(sweep, tid, a))]
    assert exploits, "no exploitation happened"
    tid, a, (after, mine) = exploits[0]
    source_id = a["source"].rsplit("-", 1)[-1]
    (copied,) = [c for s, c in tune_checkpoints(sweep, source_id)   # the one it copied: its step and wall time
                 if s == a["from_step"] and read_meta(c)["extra"]["wall_time"] == a["wall_s"]]
    # the trial's next checkpoint equals a plain --resume of the source's checkpoint, run with the
    # trial's new learning rates for one epoch: the trainer really continued the source's weights
    redo = trial_config({**read_meta(copied)["config"], "lr": a["lr"], "lr_d": a["lr_d"]}, "redo")
    redo = override(redo, out_dir=str(tmp_path / "redo"), max_steps=after, resume=True, wandb=False)
    shutil.copytree(copied, redo.run_dir / "checkpoints" / checkpoint_name(a["from_step"]))
    train(redo)
    mine, plain = weights(mine), weights(redo.run_dir / "checkpoints" / checkpoint_name(after))
    assert mine.keys() == plain.keys() and all(torch.equal(mine[k], plain[k]) for k in mine)
    best = json.loads((sweep / "best.json").read_text())
    assert best["scheduler"] == "pbt" and Path(best["best_checkpoint"]).is_dir()
    assert best["schedule"][0]["from_step"] == 0 and best["schedule"][-1]["run"].endswith(best["trial_id"])
    # PBT keeps the fields it does not mutate at cpu-demo's value, or the list's first where the list lacks it
    assert preset_point()["batch_size"] != 32 and {r["batch_size"] for r in rows.values()} == {32}


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, bool):
            out.append(("--" if v else "--no-") + k.replace("_", "-"))
        else:
            out += ["--" + k.replace("_", "-"), *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return out


BAD = [
    (["--scheduler", "bohb"], "--scheduler"),
    (["--lr-g", "1e-3"], "--lr-g takes two positive numbers"),
    (["--lr-d", "1e-3", "1e-4"], "--lr-d takes two positive numbers"),
    (["--batch-sizes", "0"], "--batch-sizes values must be >= 1"),
    (["--time-budget-s", "0"], "--time-budget-s"),
    (["--stage-samples", "20000"], "--stage-samples"),
    (["--widths", "8,x"], "--widths"),
    (["--batch-sizes", "1024", "--train-subset", "512"], "exceeds the 512 training images"),
    (["--grace-period-s", "100", "--time-budget-s", "50"], "--grace-period-s (100) must not exceed"),
    (["--resume"], "--resume: no sweep"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[f"{k}-{a[0]}" for k, (a, _) in enumerate(BAD)])
def test_bad_input_gives_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    assert_cli_usage_error(main, argv, needle, tmp_path, capsys)
