"""Tune's record of each trial, handed to the trial when it (re)starts.

A trial's trainer owns its checkpoints and continues from the latest one; Tune keeps its own record
of the trial's reports (what ASHA, results.csv and ``Tuner.restore`` go by). The two differ by the
reports Tune lost: one in flight when its driver stopped, or those it had not yet saved when the
Ray head died. Just before a trial starts (first start, FailureConfig retry, or after
``Tuner.restore``), :class:`RecordedSteps` writes ``<folder>/<trial id>`` holding the step of the
trial's last report in Tune's record, so the trial sends Tune exactly the validations it lacks.

Imports ray at module level: import this module lazily (ray is optional for training).
"""
from __future__ import annotations

import json
from pathlib import Path

from ray.tune import Callback

from trainers.files import write_json_atomic


class RecordedSteps(Callback):
    """On the driver: ``<folder>/<trial id>`` = the ``time_attr`` of the trial's last recorded report
    (``step``), with that report's values of ``keep``."""

    def __init__(self, folder: str, time_attr: str, keep: tuple[str, ...] = ()):
        self.folder, self.time_attr, self.keep = folder, time_attr, keep

    def on_trial_start(self, iteration, trials, trial, **info):
        # called before Tune asks the trial's actor for its first result, so the trial reads it
        last = trial.last_result or {}
        write_json_atomic(Path(self.folder) / trial.trial_id,
                          {"step": int(last.get(self.time_attr, 0)), **{k: last[k] for k in self.keep if k in last}})


def recorded(folder: Path, trial_id: str) -> dict:
    """In the trial: Tune's last recorded report, ``{"step": ..., <keep>...}`` (step 0: none, or no record)."""
    try:
        return json.loads((Path(folder) / trial_id).read_text())
    except (OSError, ValueError):
        return {"step": 0}


def recorded_step(folder: Path, trial_id: str) -> int:
    """In the trial: the step up to which Tune has its reports (0: none, or no record)."""
    return int(recorded(folder, trial_id).get("step", 0))
