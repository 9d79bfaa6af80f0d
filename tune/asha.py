"""ASHA run separately inside each grid point, so a trial only competes with its own task.

One plain ``ASHAScheduler`` over the whole sweep would compare an RNN at T=30 with an LSTM at
T=5 and stop the hard tasks first, which would bias the very curve the sweep is drawing
(accuracy against T). Here every (model, seq_length) pair gets its own ASHA bracket: among the
trials of one task, the ones whose validation accuracy falls below the rung's cutoff stop early.

Imports ray at module level: import this module lazily (ray is optional for training).
"""
from __future__ import annotations

from typing import Dict, Hashable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


class GroupedASHA(FIFOScheduler):
    """Delegates every decision to one ``ASHAScheduler`` per ``group_keys`` value of a trial's config."""

    def __init__(self, group_keys: tuple[str, ...], metric: str, mode: str, time_attr: str,
                 max_t: int, grace_period: int, reduction_factor: float):
        super().__init__()
        self.group_keys = group_keys
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
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: Dict):
        self._asha(tune_controller, trial).on_trial_complete(tune_controller, trial, result)
        self.known.discard(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial):
        self._asha(tune_controller, trial).on_trial_remove(tune_controller, trial)
        self.known.discard(trial.trial_id)

    def debug_string(self) -> str:
        return f"Using ASHA per {'/'.join(self.group_keys)} ({len(self.groups)} groups): num_stopped={self.num_stopped}"
