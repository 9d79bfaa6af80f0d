"""ASHA run separately inside each grid point, so a trial only competes with its own task.

One plain ``ASHAScheduler`` over the whole sweep would compare an RNN at T=30 with an LSTM at
T=5 and stop the hard tasks first, which would bias the very curve the sweep is drawing
(accuracy against T). Here every (model, seq_length) pair gets its own ASHA bracket: among the
trials of one task, the ones whose validation accuracy falls below the rung's cutoff stop early.

Two more rules, for a sweep that maps where each model stops learning:
- a floor: a trial still below ``floor_acc`` at ``floor_step`` or later (with ``floor_length``, at
  ``floor_step * T / floor_length`` for a T above it, at most half of ``max_t``: the time a long
  palindrome's trial spends at chance before it learns grows with T) is culled whatever its
  grid point's other trials do (a grid point where no trial learns would otherwise keep its best
  chance-level trial to the end);
- with ``cull_dir`` set, a culled trial is not killed: the scheduler writes its verdict to
  ``cull_dir/<trial id>`` and lets it continue, and the trial, which reads the file after each
  report (Tune answers a report only after the scheduler has judged it), ends itself and leaves a
  finished record (metrics.json, a closed wandb run) saying it was culled.

Imports ray at module level: import this module lazily (ray is optional for training).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Hashable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from trainers.files import write_text_atomic


CULLED_BY_ASHA = "culled by ASHA"


class GroupedASHA(FIFOScheduler):
    """Delegates every decision to one ``ASHAScheduler`` per ``group_keys`` value of a trial's config."""

    def __init__(self, group_keys: tuple[str, ...], metric: str, mode: str, time_attr: str,
                 max_t: int, grace_period: int, reduction_factor: float, floor_acc: float = 0.0,
                 floor_step: int = 0, cull_dir: str | None = None, floor_length: int = 0):
        super().__init__()
        self.group_keys = group_keys
        self.floor_metric, self.floor_time_attr = metric, time_attr
        self.floor_acc, self.floor_step, self.floor_length = floor_acc, floor_step, floor_length
        self.cull_dir = cull_dir
        # stop_last_trials=False: no STOP at max_t, so a trial that reaches it lets its trainer
        # return normally (final metrics.json, figures, wandb run closed) instead of being cut off.
        self.asha_kwargs = dict(metric=metric, mode=mode, time_attr=time_attr, max_t=max_t,
                                grace_period=grace_period, reduction_factor=reduction_factor,
                                stop_last_trials=False)
        self.groups: Dict[Hashable, ASHAScheduler] = {}
        self.known: set[str] = set()   # trial ids already handed to their group's ASHA
        self.num_stopped = 0

    def group_of(self, trial) -> ASHAScheduler:
        key = tuple(trial.config[k] for k in self.group_keys)
        if key not in self.groups:
            self.groups[key] = ASHAScheduler(**self.asha_kwargs)
        return self.groups[key]

    def _asha(self, controller, trial) -> ASHAScheduler:
        """The trial's ASHA, adding the trial first if it arrived without ``on_trial_add``
        (e.g. restored by ``Tuner.restore``)."""
        asha = self.group_of(trial)
        if trial.trial_id not in self.known:
            asha.on_trial_add(controller, trial)
            self.known.add(trial.trial_id)
        return asha

    def on_trial_add(self, tune_controller, trial):
        self._asha(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: Dict) -> str:
        action = self._asha(tune_controller, trial).on_trial_result(tune_controller, trial, result)
        verdict = CULLED_BY_ASHA
        metric, clock = self.floor_metric, self.floor_time_attr
        if (action != TrialScheduler.STOP and self.floor_acc > 0 and metric in result
                and result.get(clock, 0) >= self.floor_step_of(trial) and result[metric] < self.floor_acc):
            action = TrialScheduler.STOP
            verdict = f"{CULLED_BY_ASHA}: below {self.floor_acc:g} at step {result[clock]}"
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
            if self.cull_dir:
                write_text_atomic(Path(self.cull_dir) / trial.trial_id, verdict + "\n")
                return TrialScheduler.CONTINUE   # the trial reads the verdict and ends itself
        return action

    def floor_step_of(self, trial) -> float:
        t = trial.config.get("seq_length", 0)
        if not self.floor_length or t <= self.floor_length:
            return self.floor_step
        return max(self.floor_step, min(self.floor_step * t / self.floor_length, self.asha_kwargs["max_t"] / 2))

    def on_trial_complete(self, tune_controller, trial, result: Dict):
        self._asha(tune_controller, trial).on_trial_complete(tune_controller, trial, result)
        self.known.discard(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial):
        self._asha(tune_controller, trial).on_trial_remove(tune_controller, trial)
        self.known.discard(trial.trial_id)

    def debug_string(self) -> str:
        return (f"Using ASHA per {'/'.join(self.group_keys)} ({len(self.groups)} groups): "
                f"num_stopped={self.num_stopped}")
