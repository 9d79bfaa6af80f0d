"""The tracker API against wandb's own files: an offline run written through it is read back from
its transaction log (``read_offline_run``), from the tables wandb wrote, and by wandb's own reader
(``wandb leet inspect --summary --json``)."""
from __future__ import annotations

import inspect
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import run_script

from trainers.runtime import make_accelerator
from trainers.tracking import BAR_COLUMNS, NullTracker, WandbTracker, bar_rows, start_tracker
from wandb_files import leet_summary, read_offline_run


def _png(path, seed):
    plt.imsave(path, np.random.default_rng(seed).random((28, 28)), cmap="gray")
    return path


def finished_run(wandb_file, timeout: float = 60.0) -> dict:
    """``read_offline_run`` once wandb's service has written the run's exit record (it may land a
    moment after ``finish()`` returns on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_offline_run(wandb_file)
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _public_methods(cls):
    return {n for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def test_null_tracker_has_every_method_of_the_wandb_tracker_with_the_same_signature():
    assert _public_methods(WandbTracker) == _public_methods(NullTracker)
    for name in _public_methods(WandbTracker):
        assert inspect.signature(getattr(WandbTracker, name)).parameters.keys() == \
            inspect.signature(getattr(NullTracker, name)).parameters.keys(), name
    null = NullTracker()   # every call is a no-op, with no accelerator to end
    null.log({"a": 1.0}, step=1)
    null.log_images({"x": "missing.png"}, step=1, caption="c")
    null.log_table("t", ["a"], [[1]], step=1)
    null.log_bar("b", [0, 1], {"g": [0.5, 0.5]}, step=1)
    null.log_lines("l", [0, 1], {"i": [0.1, 0.2]}, step=1)
    null.summary({"final/x": 1.0})
    null.finish()


def test_bar_rows_put_each_labels_series_side_by_side():
    rows = bar_rows([0, 1], {"generated": [0.4, 0.6], "real": [0.5, 0.5]})
    assert rows == [["0 generated", "0", "generated", 0.4], ["0 real", "0", "real", 0.5],
                    ["1 generated", "1", "generated", 0.6], ["1 real", "1", "real", 0.5]]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)   # a chart sorting by bar keeps the pairs


def test_offline_run_holds_summary_charts_captions_job_type_tags_and_ends_finished(tmp_path):
    accelerator = make_accelerator("no", True, tmp_path)
    tracker = start_tracker(accelerator, "palgan-test", "tracked", {"seed": 3}, tmp_path,
                            group="g", job_type="evaluate", tags=["cpu-demo", "T5"])
    assert isinstance(tracker, WandbTracker)
    tracker.log({"train/loss": 0.5}, step=1)
    tracker.log_images({"samples/grid": _png(tmp_path / "a.png", 0),
                        "figures/losses": (_png(tmp_path / "b.png", 1), "own caption")},
                       step=2, caption="epoch 1, step 2")
    generated, real = [0.1 + 0.01 * d for d in range(10)], [0.1] * 10
    tracker.log_bar("eval/class_histogram", range(10), {"generated": generated, "real": real}, step=3,
                    title="class histogram")
    xs, gates = [0, 1, 2, 3], {"i": [0.1, 0.2, 0.3, 0.4], "f": [0.9, 0.8, 0.7, 0.6]}
    tracker.log_lines("gates/mean", xs, gates, step=3, title="gates", xname="t")
    tracker.summary({"final/fid": 8.5, "final/classifier_score": 8.9})
    run_dir = tracker.run_dir
    tracker.finish()

    (wandb_file,) = run_dir.glob("run-*.wandb")
    run = finished_run(wandb_file)
    assert run["exit_code"] == 0
    assert run["run"]["job_type"] == "evaluate" and run["run"]["tags"] == ["cpu-demo", "T5", "fp32"]
    assert run["run"]["group"] == "g" and run["config"]["seed"] == 3
    assert run["summary"]["final/fid"] == 8.5 and run["summary"]["final/classifier_score"] == 8.9
    assert not any(k.startswith("final/") for row in run["history"] for k in row)   # summary only
    assert run["charts"] == {"eval/class_histogram": "wandb/bar/v0", "gates/mean": "wandb/lineseries/v0"}
    images = {k: v for row in run["history"] for k, v in row.items() if k.endswith("/caption")}
    assert images == {"samples/grid/caption": "epoch 1, step 2", "figures/losses/caption": "own caption"}

    # The tables behind the charts, as wandb wrote them under files/
    def table(key):
        row = next(r for r in run["history"] if f"{key}_table/path" in r)
        return json.loads((run_dir / "files" / row[f"{key}_table/path"]).read_text())

    bars = table("eval/class_histogram")
    assert bars["columns"] == list(BAR_COLUMNS) and len(bars["data"]) == 20
    assert [r[3] for r in bars["data"] if r[2] == "generated"] == pytest.approx(generated)
    assert [r[3] for r in bars["data"] if r[2] == "real"] == pytest.approx(real)
    lines = table("gates/mean")
    got = {}
    for row in lines["data"]:
        rec = dict(zip(lines["columns"], row))
        got.setdefault(rec["lineKey"], []).append((rec["step"], rec["lineVal"]))
    assert got == {k: list(zip(map(float, xs), v)) for k, v in gates.items()}

    leet = leet_summary(run_dir)
    if leet is None:
        pytest.skip("this wandb has no `wandb leet` command to cross-check with")
    assert leet["state"] == "finished" and leet["exit_code"] == 0
    assert leet["summary"]["final/fid"] == 8.5 and leet["tags"] == ["cpu-demo", "T5", "fp32"]
    assert leet["summary"]["samples/grid"]["caption"] == "epoch 1, step 2"


# --- the trainers' runs --------------------------------------------------------------------------

def _series(history: list[dict]) -> set[str]:
    """The scalar series of a run's history (media keys such as ``x/path`` or ``x_table/...`` left out)."""
    keys = {k for row in history for k in row}
    media = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/_type")}
    return {k for k in keys if not k.startswith("_") and not any(k.startswith(m + "/") for m in media)}


def test_gan_run_puts_final_numbers_in_the_summary_and_the_histogram_in_a_bar_chart(tmp_path):
    proc = run_script(["trainers/gan.py", "--preset", "cpu-demo", "--base-channels", "4", "--batch-size", "32",
                       "--train-subset", "256", "--epochs", "1", "--stages", "0,1", "--stage-samples", "200",
                       "--eval-samples", "400", "--log-every", "4", "--no-progress", "--out-dir", tmp_path,
                       "--run-name", "g"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "g" / "metrics.json").read_text())
    (wandb_file,) = (tmp_path / "g").glob("wandb/offline-run-*/run-*.wandb")
    run = finished_run(wandb_file)

    assert run["exit_code"] == 0
    assert run["run"]["job_type"] == "train" and run["run"]["tags"] == ["cpu-demo", "b4", "bf16"]
    assert _series(run["history"]) == {
        "train/loss_d", "train/loss_g", "train/d_x", "train/d_g_z", "train/epoch", "train/skipped_d",
        "train/skipped_g", "stage/epoch", "eval/fid", "eval/classifier_score", "eval/class_entropy",
        "eval/min_class_frac", "eval/max_class_frac"}
    final, summary = metrics["final"], run["summary"]
    for key in ("fid", "fid_floor", "fid_over_floor", "classifier_score", "classifier_score_floor",
                "class_entropy", "min_class_frac", "max_class_frac", "n"):
        assert summary[f"final/{key}"] == pytest.approx(final[key]), key
    # numbers only: no pass/fail verdicts, no per-rank counts, in metrics.json or the summary
    for key in ("fid_ok", "score_ok", "classes_ok", "goal"):
        assert key not in final and f"final/{key}" not in summary and key not in metrics, key
    assert "eval_images_per_rank" not in metrics and not any("images_per_rank" in k for k in summary)
    for key in ("steps", "wall_time_s", "train_images_per_s", "finished"):
        assert summary[key] == metrics[key], key
    assert not any(k.startswith("class_frac") or k.startswith("final/class_frac") for k in summary)

    assert run["charts"] == {"eval/class_histogram": "wandb/bar/v0"}
    row = next(r for r in run["history"] if "eval/class_histogram_table/path" in r)
    table = json.loads((wandb_file.parent / "files" / row["eval/class_histogram_table/path"]).read_text())
    got = {(r[1], r[2]): r[3] for r in table["data"]}
    for d in range(10):
        assert got[(str(d), "generated")] == pytest.approx(final[f"class_frac_{d}"])
        assert got[(str(d), "real floor")] == pytest.approx(final[f"class_frac_{d}_floor"])
    captions = [r["samples/grid/caption"] for r in run["history"] if "samples/grid/caption" in r]
    assert captions == ["epoch 0, iteration 0", f"epoch 1, iteration {metrics['steps']}"]
    assert any(r.get("interp/walks/_type") == "table-file" for r in run["history"])

    leet = leet_summary(wandb_file.parent)
    if leet is not None:   # wandb's own reading agrees
        assert leet["state"] == "finished" and leet["summary"]["final/fid"] == pytest.approx(final["fid"])


def test_evaluate_with_wandb_is_an_evaluate_run_with_summary_and_bar_chart(tmp_path):
    import torch

    from trainers.gan_evaluate import evaluate_main

    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.save(images, tmp_path / "noise.pt")
    result = evaluate_main(["--images", str(tmp_path / "noise.pt"), "--wandb"])
    (wandb_file,) = (tmp_path / "noise_eval").glob("wandb/offline-run-*/run-*.wandb")
    run = finished_run(wandb_file)
    assert run["exit_code"] == 0 and run["run"]["job_type"] == "evaluate"
    assert run["run"]["name"] == "evaluate-noise" and run["run"]["tags"] == ["images", "fp32"]
    assert run["summary"]["final/fid"] == pytest.approx(result["generated"]["fid"])
    assert run["summary"]["final/fid_floor"] == pytest.approx(result["real_floor"]["fid"])
    assert run["summary"]["final/n"] == 64
    assert run["summary"]["final/fid_over_floor"] == pytest.approx(result["fid_over_floor"])
    assert not any(k.endswith(("_ok", "/goal")) for k in run["summary"]) and "goal" not in result
    assert run["charts"] == {"eval/class_histogram": "wandb/bar/v0"}
    assert not any(k.startswith("final/") for row in run["history"] for k in row)


def test_lstm_run_logs_gate_means_as_a_line_plot_of_the_saved_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainers.cli import from_saved
    from trainers.lstm import LSTMConfig, build_model, validation_set

    proc = run_script(["trainers/lstm.py", "--hidden-dim", "16", "--steps", "40", "--eval-every", "20",
                       "--val-size", "200", "--no-progress", "--out-dir", tmp_path, "--run-name", "l"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "l" / "metrics.json").read_text())
    (wandb_file,) = (tmp_path / "l").glob("wandb/offline-run-*/run-*.wandb")
    run = finished_run(wandb_file)
    assert run["exit_code"] == 0
    assert run["run"]["job_type"] == "train" and run["run"]["tags"] == ["lstm", "T5", "onehot", "fp32"]
    assert _series(run["history"]) == {"train/loss", "train/acc", "val/loss", "val/acc"}
    assert run["summary"]["val/acc"] == pytest.approx(metrics["val/acc"])
    for key in ("steps", "wall_time_s", "best_val_acc", "best_step", "stop_reason"):
        assert run["summary"][key] == metrics[key], key
    assert run["charts"] == {"gates/mean": "wandb/lineseries/v0"}

    # the plotted means are those of the saved weights on the first validation palindrome, computed here
    cfg = from_saved(LSTMConfig, metrics["config"])
    model = build_model(cfg).eval()
    model.load_state_dict(load_file(tmp_path / "l" / "checkpoints" / "step_00000040" / "model.safetensors"))
    x, _ = validation_set(cfg)[0:1]
    with torch.no_grad():
        _, states = model(x, return_states=True)
    row = next(r for r in run["history"] if "gates/mean_table/path" in r)
    table = json.loads((wandb_file.parent / "files" / row["gates/mean_table/path"]).read_text())
    lines: dict[str, list] = {}
    for rec in (dict(zip(table["columns"], r)) for r in table["data"]):
        lines.setdefault(rec["lineKey"], []).append((rec["step"], rec["lineVal"]))
    labels = {"input gate i": "i", "forget gate f": "f", "output gate o": "o", "cell c": "c", "hidden h": "h"}
    assert set(lines) == set(labels)
    for label, key in labels.items():
        expected = states[key][0].mean(1)                   # (T-1,): mean over units per step
        assert [t for t, _ in lines[label]] == list(range(cfg.data.seq_length - 1))
        assert [v for _, v in lines[label]] == pytest.approx(expected.tolist(), abs=1e-6), label


# --- one run across restarts -----------------------------------------------------------------------

def test_a_resumed_segment_continues_the_kept_run_online_and_is_a_new_run_of_the_same_group_offline():
    from trainers.tracking import resume_init_kwargs
    assert resume_init_kwargs("online", "r", None, 0, None) == {"group": "r"}          # a new run
    assert resume_init_kwargs("online", "r", "sweep", 0, "abc") == {"group": "sweep"}  # not resumed: no id reused
    assert resume_init_kwargs("online", "r", None, 80, "abc") == {"group": "r", "id": "abc", "resume": "allow"}
    assert resume_init_kwargs("offline", "r", "sweep", 80, "abc") == {"group": "sweep"}   # wandb cannot resume offline
    assert resume_init_kwargs("online", "r", None, 80, None) == {"group": "r"}          # no id kept: a new run


def test_the_kept_run_id_reads_back_or_is_none_for_a_missing_or_corrupt_file(tmp_path):
    from trainers.files import write_json_atomic
    from trainers.tracking import RUN_ID_FILE, read_run_id
    assert read_run_id(tmp_path) is None
    (tmp_path / RUN_ID_FILE).write_text("{not json")
    assert read_run_id(tmp_path) is None
    write_json_atomic(tmp_path / RUN_ID_FILE, {"id": "k3pt1d"})
    assert read_run_id(tmp_path) == "k3pt1d"


def test_sigkill_then_resume_offline_gives_two_segments_of_one_name_and_group_with_no_step_logged_again(tmp_path):
    """An LSTM run (default configuration, tiny sizes) is killed after a checkpoint and resumed. Read
    back from the offline files: the first segment is the run whose id the run folder keeps; the
    second has the same name and group, is tagged ``resumed``, records the checkpoint's step, and
    logs only steps after it, each once, on the trainer's schedule."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT, clean_env, signal_when

    from trainers.tracking import RUN_ID_FILE, read_run_id

    args = ["trainers/lstm.py", "--hidden-dim", "16", "--val-size", "200", "--batch-size", "32", "--no-progress",
            "--eval-every", "20", "--log-every", "10", "--checkpoint-every", "20", "--out-dir", tmp_path,
            "--run-name", "cut"]
    run = tmp_path / "cut"
    child = subprocess.Popen([sys.executable, *map(str, args), "--steps", "100000"], cwd=ROOT, env=clean_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    signal_when(child, (run / "checkpoints" / "step_00000040").exists, signal.SIGKILL, "checkpoint step_00000040")
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    kept = read_run_id(run)
    assert kept and json.loads((run / RUN_ID_FILE).read_text())["group"] == "cut"
    last = max((run / "checkpoints").glob("step_*"))
    held = int(last.name[len("step_"):])
    held_steps = [row["step"] for row in json.loads((last / "palgan.json").read_text())["extra"]["history"]
                  if "train/loss" in row]   # the curve the checkpoint holds, read before the resume
    end = held + 30
    resumed = run_script([*args, "--resume", "--steps", str(end)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_run_id(run) == kept   # the run folder still names the run the segments belong to

    (first,) = run.glob(f"wandb/offline-run-*-{kept}/run-{kept}.wandb")
    (second,) = [f for f in run.glob("wandb/offline-run-*/run-*.wandb") if f != first]
    one, two = read_offline_run(first), finished_run(second)   # the first: what wandb wrote before the kill
    assert two["run"]["name"] == two["run"]["group"] == "cut"
    assert two["run"]["tags"] == ["lstm", "T5", "onehot", "fp32", "resumed"]
    if "name" in one["run"]:   # a SIGKILL can come before wandb writes the first segment's run record
        assert one["run"]["name"] == one["run"]["group"] == "cut"
        assert one["run"]["tags"] == ["lstm", "T5", "onehot", "fp32"]
    assert "resumed_from_step" not in one.get("config", {}) and two["config"]["resumed_from_step"] == held
    assert two["exit_code"] == 0

    def steps(history, key):
        return [r["_step"] for r in history if key in r]

    # the second segment logs every step after the checkpoint, once, and none at or before it: with
    # the checkpoint's curve it is the run's whole curve, each step once
    assert held_steps == list(range(10, held + 1, 10))
    assert steps(two["history"], "train/loss") == list(range(held + 10, end, 10)) + [end]
    assert steps(two["history"], "val/acc") == list(range(held + 20, end, 20)) + [end]
    assert min(r["_step"] for r in two["history"]) > held
    assert set(steps(one["history"], "train/loss")) <= set(range(10, 100000, 10))   # what was flushed, if any

    leet = leet_summary(second.parent)
    if leet is not None:   # wandb's own reading agrees
        assert leet["state"] == "finished" and "resumed" in leet["tags"]
        assert leet["config"]["resumed_from_step"] == held
