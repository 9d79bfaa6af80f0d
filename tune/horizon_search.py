"""The LSTM sweep's search as a Ray Tune ``Searcher``: the fixed grid, then each model's extension
past it (tune/horizon.py's rule), every model on its own.

A model's next cell is asked for as soon as all of its own trials have ended, so one model's long
extension never waits for another model's trials, and the CPUs they free start the next trial at
once. Its points go to the front of the queue: the extension is the sweep's critical path. A cell
past the grid is answered once one of its draws solves it; its draws not yet started are dropped
(more draws only count where every draw fails). The grid's draws all run: they are also the search
over configurations.
The search ends once every model's rule says its horizon is found and no trial runs.

Tune saves this object with its experiment state, so ``--resume`` continues it where it stopped.
"""
from __future__ import annotations

import math
import pickle
from typing import Callable

from ray.tune.search import Searcher

from tune.report import SOLVED

ROW_KEYS = ("sweep_model", "round", "seq_length", "draw", "hidden_dim", "lr", "forget_bias")


class HorizonSearch(Searcher):
    """Suggest ``grid`` (each a trial's full config) in order, then, per model, what
    ``extend(rows, model)`` asks for from the rows of its ended trials ([]: its horizon is found)."""

    def __init__(self, grid: list[dict], models: list[str], extend: Callable[[list[dict], str], list[dict]],
                 metric: str = "val/acc", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.queue = list(grid)      # points not suggested yet, in order
        self.models = list(models)
        self.extend = extend
        self.live: dict[str, dict] = {}   # trial id -> the row of a trial that has not ended
        self.rows: list[dict] = []        # the ended trials' rows: what the rule reads
        self.found: set[str] = set()      # models whose horizon is found

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.queue:   # nothing to start now: wait for a model's trials to end, or finish
            return Searcher.FINISHED if not self.live and self.found >= set(self.models) else None
        point = self.queue.pop(0)
        self.live[trial_id] = {"model": point["sweep_model"], **{k: point[k] for k in ROW_KEYS},
                               "best_val_acc": None, "steps_to_99": None}
        return point

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        row, acc = self.live.get(trial_id), result.get(self.metric)
        if row is None or acc is None or math.isnan(acc):
            return
        row["best_val_acc"] = max(acc, row["best_val_acc"] or 0.0)
        if acc >= SOLVED and row["steps_to_99"] is None:
            row["steps_to_99"] = int(result["step"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        if result:
            self.on_trial_result(trial_id, result)
        row = self.live.pop(trial_id)
        self.rows.append(row)
        model = row["model"]
        if row["round"] and (row["best_val_acc"] or 0) >= SOLVED:   # a cell past the grid is answered: solved
            self.queue = [p for p in self.queue if (p["sweep_model"], p["seq_length"]) != (model, row["seq_length"])]
        busy = any(r["model"] == model for r in self.live.values()) or any(p["sweep_model"] == model
                                                                           for p in self.queue)
        if busy or model in self.found:
            return
        points = self.extend(self.rows, model)
        if points:
            self.queue[:0] = points
        else:
            self.found.add(model)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({k: getattr(self, k) for k in ("queue", "live", "rows", "found")}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
