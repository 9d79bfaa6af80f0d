"""The tracker API against wandb's own files: an offline run written through it is read back from
its transaction log (``read_offline_run``), from the tables wandb wrote, and by wandb's own reader
(``wandb leet inspect --summary --json``)."""
from __future__ import annotations

import inspect
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from trainers.runtime import make_accelerator
from trainers.tracking import (BAR_COLUMNS, NullTracker, WandbTracker, bar_rows, leet_summary,
                               read_offline_run, start_tracker)


def _png(path, seed):
    plt.imsave(path, np.random.default_rng(seed).random((28, 28)), cmap="gray")
    return path


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
                            group="g", job_type="evaluate", tags=["cpu-demo", "T5", "bf16"])
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
    run = read_offline_run(wandb_file)
    assert run["exit_code"] == 0
    assert run["run"]["job_type"] == "evaluate" and run["run"]["tags"] == ["cpu-demo", "T5", "bf16"]
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
    assert leet["summary"]["final/fid"] == 8.5 and leet["tags"] == ["cpu-demo", "T5", "bf16"]
    assert leet["summary"]["samples/grid"]["caption"] == "epoch 1, step 2"
