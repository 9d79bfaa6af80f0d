"""What a sweep would cost on this machine, before running it.

    python tune/sweep_cost.py                 # the full sweep's grid (same flags as tune/lstm_sweep.py)
    python tune/sweep_cost.py --quick         # the quick preset

For every (model, T, hidden_dim) of the grid it times training steps and one validation pass of the
trainer's own model, data and optimiser (RMSprop) with torch using --cpus-per-trial threads, then
projects the trial-time of the sweep: every trial run to --steps (the upper bound: solved and
culled trials end early), hidden_dim drawn uniformly. Ray's start-up and each trial's start (~5-10 s: a fresh worker
imports torch) are not included. Timings on a shared machine are noisy: each is the median of rounds.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from trainers.cli import build, run_cli
from trainers.lstm import LSTMConfig, build_model, train_batch, validation_set
from tune.horizon import arch, rnn_init
from tune.lstm_sweep import hidden_dims, lengths_of, parse_sweep

ROUNDS = 3          # timing rounds per point; the median is kept
STEPS_PER_ROUND = 5  # training steps per round


def time_point(cfg: LSTMConfig) -> tuple[float, float]:
    """(seconds per training step, seconds per validation pass) for one config."""
    model = build_model(cfg)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.optim.lr)
    x, y = train_batch(cfg, 0, 1)
    val_x, _ = validation_set(cfg).tensors

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (TorchScript profiles its first calls)
    step_times, eval_times = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            step()
        step_times.append((time.perf_counter() - t0) / STEPS_PER_ROUND)
        t0 = time.perf_counter()
        with torch.no_grad():
            for chunk in val_x.split(1000):
                model(chunk)
        eval_times.append(time.perf_counter() - t0)
    return statistics.median(step_times), statistics.median(eval_times)


def main(argv=None) -> dict:
    sc = parse_sweep(argv, prog="tune/sweep_cost.py", description=__doc__.splitlines()[0])
    s, tr, sch = sc.search, sc.trial, sc.scheduling
    models = list(dict.fromkeys(s.models))
    torch.set_num_threads(max(1, int(sch.cpus_per_trial)))
    evals = -(-tr.steps // tr.eval_every)
    print(f"{'model':>14} {'T':>3} {'H':>4} {'ms/step':>8} {'s/eval':>7} {'trial min':>9}")
    per_cell: dict[tuple[str, int], float] = {}
    for model in models:
        for t in lengths_of(sc, model):
            trial_s = []
            for h in hidden_dims(sc):
                cfg = build(LSTMConfig, model=arch(model), rnn_init=rnn_init(model), seq_length=t, hidden_dim=h, batch_size=tr.batch_size,
                            val_size=tr.val_size, seed=tr.seed, input_encoding=tr.input_encoding)
                step_s, eval_s = time_point(cfg)
                trial_s.append(tr.steps * step_s + evals * eval_s)
                print(f"{model:>14} {t:>3} {h:>4} {1000 * step_s:8.2f} {eval_s:7.3f} {trial_s[-1] / 60:9.1f}",
                      flush=True)
            per_cell[model, t] = s.num_samples * statistics.mean(trial_s)   # hidden_dim drawn uniformly
    total = sum(per_cell.values())
    cpus = sch.num_cpus or os.cpu_count() or 1
    slots = max(1, int(cpus // sch.cpus_per_trial))
    print(f"{s.num_samples * len(per_cell)} trials x {tr.steps} steps: {total / 3600:.2f} trial-hours (every trial "
          "to the end; solved and culled trials end early)")
    for model in models:
        print(f"  {model}: {sum(v for (m, _), v in per_cell.items() if m == model) / 3600:.2f} trial-hours")
    print(f"  = {total / 3600 / slots:.2f} h of wall time on {cpus} CPUs at {sch.cpus_per_trial:g} per trial "
          f"({slots} trial(s) at once)")
    return {"trial_hours": total / 3600, "per_cell_s": per_cell}


if __name__ == "__main__":
    run_cli(main)
