"""Ray Tune sweep of the palindrome trainer: how far back each model remembers (its horizon in T).

    python tune/lstm_sweep.py                                 # the experiment: <= 30 min on a 2-core CPU
    python tune/lstm_sweep.py --quick                         # <= 5 min: one T the LSTM solves and the RNN not
    python tune/lstm_sweep.py --input-encoding scalar --name lstm-sweep-scalar   # the 1-d input's map
    python tune/lstm_sweep.py --address HEAD:6379 --gpus-per-trial 0.25   # join a running Ray cluster
    python tune/lstm_sweep.py --quick --resume                # continue an interrupted sweep (Ctrl-C once)

Each trial is ``trainers.lstm.train(LSTMConfig)``, the CLI's own loop, in its own run folder. A grid
point (model, T) gets --num-samples draws of hidden_dim and lr (and, in turn, the LSTM's forget-gate
bias), each with its own seed. A trial ends as soon as its question is answered: solved (>=
--solved-acc at --solve-patience validations in a row), culled by ASHA against the other draws of its
grid point or for staying below --floor-acc, or at --steps; its metrics.json and wandb run say which.
A model is an architecture and, for the RNN, the init of its W_hh (rnn, rnn-orthogonal, rnn-identity).

After its grid, each model's T is extended upward (tune/horizon.py: doubling, then bisecting between
the last solved and the first failed T) with --horizon-draws seeds of the best configuration at the
last solved T, until it fails with every draw; each model's next cell starts as soon as its own
trials have ended (tune/horizon_search.py). The report gives each horizon as "solved at T_s, failed
at T_f with n draws".

Writes <out-dir>/sweeps/<name>/: sweep.json (the flags), tune/ (Ray's experiment state), trials/<run>/
(the trainer's run folders) and, once every trial has ended, the report (tune/report.py).
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

from trainers.checkpoint import PREFIX, list_checkpoints, read_meta
from trainers.cli import (UsageError, check_choices, flatten, from_saved, override, require_at_least,
                          require_non_negative, require_positive, run_cli)
from trainers.lstm import LSTMConfig, train
from tune import common, report
from tune.common import Floats, Ints, check_list, listing
from tune.horizon import MODELS, arch, cell_results, next_cell, rnn_init

METRIC = "val/acc"              # what ASHA compares
TIME_ATTR = "step"              # ASHA's clock: the trainer step of each report
ATTEMPTS = "attempts.jsonl"     # one line per start of a trial's trainer (first start or resume)
CULLED = "culled"               # <sweep>/culled/<trial id>: the scheduler's verdict on a trial it culls
RECORDED = "recorded"           # <sweep>/recorded/<trial id>: the last step Tune recorded as the trial started


# --- config ----------------------------------------------------------------------------------

Models = Annotated[tuple[str, ...], listing(str, "{" + ",".join(MODELS) + "}")]


@dataclass
class Search:
    """search space"""
    models: Models = MODELS  # models to sweep (rnn-orthogonal, rnn-identity: the RNN with that W_hh init)
    lstm_seq_lengths: Ints = (50, 100, 200, 400)  # the LSTM's grid of palindrome lengths T (the extension goes on)
    rnn_seq_lengths: Ints = (10, 30, 60)  # the RNNs' grid of palindrome lengths T (the extension goes on)
    seq_lengths: Ints = ()  # one grid of T for every model, in place of the two above
    hidden_dims: Ints = (32, 64)  # hidden sizes drawn from (uniformly)
    lr_min: float = 7e-4  # lower end of the log-uniform learning-rate range
    lr_max: float = 2e-3  # upper end of the log-uniform learning-rate range
    forget_biases: Floats = (3.0, 5.0, 7.0)  # LSTM forget-gate biases; a grid point's draws take them in turn
    num_samples: int = 3  # draws per grid point (model, T), each with its own seed
    horizon_draws: int = 4  # past the grid: draws per T, and at least this many at the first failed T (0: no extension)
    horizon_resolution: float = 1.5  # stop bisecting once the first failed T is within this factor of the last solved
    max_seq_length: int = 4000  # the longest T the extension tries


@dataclass
class Trial:
    """every trial (the rest of LSTMConfig keeps the trainer's defaults)"""
    steps: int = 3000  # most training steps of a trial
    eval_every: int = 250  # steps between validation passes = Tune reports = checkpoints
    batch_size: int = 128  # sequences per step
    val_size: int = 5000  # validation sequences per T (a fixed set)
    solved_acc: float = 0.999  # validation accuracy that counts as solved
    solve_patience: int = 2  # validations in a row at >= --solved-acc that end a trial as solved (0: never)
    input_encoding: Literal["onehot", "scalar"] = "onehot"  # digit encoding (scalar: the course template's 1-d input)
    seed: int = 0  # seed of a grid point's first draw (draw k: seed + k) and of the (hidden_dim, lr) draws


@dataclass
class Scheduling(common.Resources):
    """scheduling and resources"""
    grace_period: int = 1000  # ASHA: steps before a trial can be stopped
    reduction_factor: float = 3.0  # ASHA: keep the top 1/rf of a grid point's trials at each rung
    floor_acc: float = 0.15  # cull a trial below this val accuracy from --floor-step on (chance: 0.1; 0: off)
    floor_step: int = 750  # the step from which --floor-acc applies
    floor_length: int = 100  # above this T the floor starts later: --floor-step x T / --floor-length, at most --steps / 2 (0: never)


@dataclass
class Output(common.Output):
    """output"""
    name: str = "lstm-sweep"  # sweep name: folder and wandb group (--quick: quick)
    quick: bool = False  # the quick preset: T in 10 50 100, two draws, short trials (flags given still apply)


@dataclass
class SweepConfig:
    """Ray Tune sweep of the palindrome trainer: each model's horizon in T."""
    search: Search = field(default_factory=Search)
    trial: Trial = field(default_factory=Trial)
    scheduling: Scheduling = field(default_factory=Scheduling)
    output: Output = field(default_factory=Output)

    def validate(self) -> None:
        check_choices(self)
        s, t, sch = self.search, self.trial, self.scheduling
        if not s.models:
            raise UsageError("--models is empty; give lstm, rnn or both")
        for m in s.models:
            if m not in MODELS:
                raise UsageError(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
            lengths_of(self, m)
        check_list(s.hidden_dims, "hidden_dims", low=1)
        require_at_least(s.horizon_draws, 0, "horizon_draws")
        require_at_least(s.max_seq_length, 2, "max_seq_length")
        if not s.horizon_resolution > 1:
            raise UsageError(f"--horizon-resolution must be > 1, got {s.horizon_resolution}")
        check_list(s.forget_biases, "forget_biases")
        for name, value in (("lr_min", s.lr_min), ("lr_max", s.lr_max), ("cpus_per_trial", sch.cpus_per_trial)):
            require_positive(value, name)
        require_non_negative(sch.gpus_per_trial, "gpus_per_trial")
        for low, names in ((1, ("num_samples", "steps", "eval_every", "batch_size", "val_size", "grace_period",
                                "floor_step")), (0, ("solve_patience", "max_failures", "num_cpus", "floor_length"))):
            for name in names:
                require_at_least(flatten(self)[name], low, name)
        for ok, why in ((s.lr_min < s.lr_max, f"the lr range is empty or inverted (--lr-min {s.lr_min:g} >= "
                                              f"--lr-max {s.lr_max:g}); give --lr-min below --lr-max"),
                        (0 < t.solved_acc <= 1, f"--solved-acc must lie in (0, 1], got {t.solved_acc}"),
                        (0 <= sch.floor_acc < 1, f"--floor-acc must lie in [0, 1), got {sch.floor_acc}"),
                        (sch.grace_period <= t.steps, f"--grace-period ({sch.grace_period}) must not exceed "
                                                      f"--steps ({t.steps})"),
                        (sch.reduction_factor > 1, f"--reduction-factor must be > 1, got {sch.reduction_factor}")):
            if not ok:
                raise UsageError(why)
        common.check_output(self)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output.out_dir).expanduser().resolve() / "sweeps" / self.output.name


# The quick preset: one T both models learn and two beyond the RNN's horizon, where the LSTM with a
# forget bias of 5 solves within a few hundred to a thousand steps. Flags given still apply.
# Its extension stops at T=100 and bisects the RNN's gap to within x2.
QUICK = dict(models=("lstm", "rnn"), lstm_seq_lengths=(10, 50, 100), rnn_seq_lengths=(10, 50, 100),
             forget_biases=(5.0,), num_samples=2, horizon_draws=2, horizon_resolution=2.0, max_seq_length=100,
             steps=2000, eval_every=100, grace_period=300, floor_step=500, val_size=2000, name="quick")


def parse_sweep(argv: Sequence[str] | None, prog: str, description: str) -> SweepConfig:
    """The command line -> a validated SweepConfig; with --quick the preset replaces the defaults."""
    return common.parse_with_preset(SweepConfig, QUICK, argv, prog, description)


def lengths_of(sc: SweepConfig, model: str) -> list[int]:
    """The grid of T for ``model``: --seq-lengths when given, else its architecture's own grid."""
    name = "seq_lengths" if sc.search.seq_lengths else f"{arch(model)}_seq_lengths"
    check_list(getattr(sc.search, name), name, low=2)
    return sorted(set(getattr(sc.search, name)))


def hidden_dims(sc: SweepConfig) -> list[int]:
    return sorted(set(sc.search.hidden_dims))


# --- one trial (runs inside a Ray worker) --------------------------------------------------------

def trial_config(config: dict, trial_id: str) -> LSTMConfig:
    """A trial's trainer config: its Tune config names LSTMConfig fields (the sweep's fixed settings
    and the sampled point); its run folder is named after the point and the trial id."""
    cfg = from_saved(LSTMConfig, config)
    model = config.get("sweep_model", cfg.model.model)   # rnn-identity for --model rnn --rnn-init identity
    return override(cfg, run_name=f"{model}-T{cfg.data.seq_length}-h{cfg.model.hidden_dim}-{trial_id}")


def lost_reports(run_dir: Path, recorded: int) -> list[dict]:
    """The reports the run made after step ``recorded``, rebuilt from its latest checkpoint's
    history as ``on_eval`` sent them: each validation with the train scalars logged before it."""
    found = list_checkpoints(run_dir / "checkpoints")
    out, last_train = [], {}
    for row in read_meta(found[-1])["extra"].get("history", []) if found else []:
        if "val/acc" not in row:
            last_train = {k: v for k, v in row.items() if k != "step"}
        elif row["step"] > recorded:
            out.append({**last_train, **row})
    return out


def start_step(run_dir: Path) -> int | None:
    """Where a (re)started trial's trainer continues: its run folder's latest checkpoint (0 with
    none), or None when the run had already ended. Clears what an earlier attempt leaves that the
    next one writes again."""
    if common.read_metrics(run_dir).get("finished"):
        return None
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:   # from scratch: drop a checkpoints/best of an attempt that never checkpointed
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)   # a failed attempt's; written again at the end
    return int(found[-1].name[len(PREFIX):]) if found else 0


def run_trial(config: dict) -> None:
    """The Tune function trainable: one trainer run, which owns the trial's checkpoints.

    A (re)started trial (a FailureConfig retry, --resume) continues from its run folder's latest
    checkpoint. The trainer writes it before it reports that validation, so Tune may have lost
    reports the run made (in flight when Tune stopped, or unsaved when the head died): the trial
    first sends those, from the checkpoint's history, and never one Tune has (tune/record.py). A
    checkpoint whose report Tune stopped the trial without taking (Ctrl-C) is dropped, so a clean
    stop leaves the run folder at Tune's record."""
    import ray
    from ray import tune

    from tune.asha import CULLED_BY_ASHA
    from tune.cluster import hide_unassigned_gpus
    from tune.record import recorded_step

    hide_unassigned_gpus(ray.get_gpu_ids())   # a 0-GPU trial trains on its CPUs
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config, trial_id)
    sweep_dir, run_dir = Path(cfg.run.out_dir).parent, cfg.run_dir
    recorded = recorded_step(sweep_dir / RECORDED, trial_id)
    verdict = sweep_dir / CULLED / trial_id

    def send(metrics: dict, ckpt: Path | None = None) -> None:
        step = int(metrics["step"])
        if step <= recorded:   # Tune has it
            return
        try:
            tune.report({**{k: float(v) for k, v in metrics.items() if k != "step"}, TIME_ATTR: step})
        except SystemExit:   # Tune stopped the trial with this report untaken: redo the step on resume
            if ckpt is not None:
                shutil.rmtree(ckpt, ignore_errors=True)
            raise

    for metrics in lost_reports(run_dir, recorded):
        send(metrics)
    start = start_step(run_dir)
    if start is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps({"from_step": start, "time": time.time(), "pid": os.getpid()}) + "\n")

    def on_eval(step: int, metrics: dict, ckpt: Path | None) -> str | None:
        """Report, then end the run if the scheduler culled it (the verdict is on disk by the time
        Tune answers): the trainer ends as it would any run (metrics.json, figures, wandb)."""
        send({**metrics, "step": step}, ckpt)
        return (verdict.read_text().strip() or CULLED_BY_ASHA) if verdict.exists() else None

    train(override(cfg, resume=start > 0), on_eval=on_eval)


def trial_dirname(trial) -> str:
    return f"{trial.config['sweep_model']}-T{trial.config['seq_length']}-{trial.trial_id}"


# --- the search: the grid, then each model's extension -----------------------------------------------

def fixed_trial_settings(sc: SweepConfig) -> dict:
    """LSTMConfig fields shared by every trial (in the param space, so --resume keeps them)."""
    t, out = sc.trial, sc.output
    return dict(steps=t.steps, eval_every=t.eval_every, checkpoint_every=t.eval_every, batch_size=t.batch_size,
                val_size=t.val_size, input_encoding=t.input_encoding, solved_acc=t.solved_acc,
                stop_when_solved=t.solve_patience, out_dir=str(sc.sweep_dir / "trials"), wandb=out.wandb,
                wandb_project=out.wandb_project, wandb_group=out.name, wandb_job_type="sweep-trial",
                progress=False, num_threads=max(1, int(sc.scheduling.cpus_per_trial)))


def point(model: str, t: int, draw: int, seed: int, forget_bias: float, hidden_dim: int, lr: float,
          round_: int = 0) -> dict:
    """One trial's entry: its sweep model (and the trainer's --model and --rnn-init), T, draw, seed,
    its configuration, and ``round`` (0: the grid; k: the model's k-th cell past it)."""
    return {"sweep_model": model, "model": arch(model), "rnn_init": rnn_init(model), "seq_length": t, "draw": draw,
            "seed": seed, "forget_bias": forget_bias if arch(model) == "lstm" else LSTMConfig().model.forget_bias,
            "hidden_dim": hidden_dim, "lr": lr, "round": round_}


def grid_points(sc: SweepConfig) -> list[dict]:
    """One entry per trial: (model, T, draw k) with seed + k, the LSTM's draw k with the k-th forget
    bias in turn, hidden_dim and lr drawn (uniform, log-uniform) from --seed. The costliest grid points
    come first (longest T, the LSTM before the RNN), so the long trials do not all start at the end;
    a grid point's draws are next to each other, so ASHA compares them early."""
    s, rng = sc.search, random.Random(sc.trial.seed)
    cells = sorted(((m, t, k) for m in dict.fromkeys(s.models) for t in lengths_of(sc, m) for k in range(s.num_samples)),
                   key=lambda c: (-c[1], c[0], c[2]))
    return [point(m, t, k, sc.trial.seed + k, s.forget_biases[k % len(s.forget_biases)],
                  hidden_dim=rng.choice(hidden_dims(sc)),
                  lr=math.exp(rng.uniform(math.log(s.lr_min), math.log(s.lr_max)))) for m, t, k in cells]


def extension_points(sc: SweepConfig, rows: list[dict], models: Sequence[str] | None = None) -> list[dict]:
    """The next cell past the grid (tune/horizon.py's rule on each model's results so far) of each of
    ``models`` (default: all) whose horizon is not found yet: the draws of its next T, each a new seed
    of the best configuration (hidden_dim, lr, forget bias) at its longest solved T. Empty: found."""
    s, points = sc.search, []
    if not s.horizon_draws:
        return points
    for model in dict.fromkeys(models or s.models):
        results = cell_results(rows, model, report.SOLVED)
        cell = next_cell(results, s.horizon_draws, s.horizon_resolution, s.max_seq_length)
        if cell is None:
            continue
        t, add = cell
        t_s = max(x for x, (solved, _) in results.items() if solved)
        best = report.best_per_cell(rows)[model, t_s]
        ran, round_ = results.get(t, (0, 0))[1], 1 + max(r["round"] for r in rows if r["model"] == model)
        points += [point(model, t, k, sc.trial.seed + k, best["forget_bias"] or 0.0, hidden_dim=best["hidden_dim"],
                         lr=best["lr"], round_=round_) for k in range(ran, ran + add)]
    return points


def checked(sc: SweepConfig, points: list[dict]) -> list[dict]:
    """``points``, each validated as a trial config (a one-line error before any worker starts it)."""
    for p in points:
        trial_config({**fixed_trial_settings(sc), **p}, "check").validate()
    return points


def extend(sc: SweepConfig, rows: list[dict], model: str) -> list[dict]:
    """HorizonSearch's question: ``model``'s next points, each a checked trial config."""
    return checked(sc, extension_points(sc, rows, [model]))


def check_trial_configs(sc: SweepConfig) -> None:
    """Validate every grid trial's config before any worker starts."""
    checked(sc, grid_points(sc))


def build_tuner(sc: SweepConfig, trainable, callbacks=None, verbose: int = 1):
    from ray import tune

    from tune.asha import GroupedASHA
    from tune.horizon_search import HorizonSearch
    from tune.record import RecordedSteps

    sch = sc.scheduling
    search = HorizonSearch(grid_points(sc), list(dict.fromkeys(sc.search.models)), functools.partial(extend, sc),
                           metric=METRIC, mode="max")
    scheduler = GroupedASHA(("sweep_model", "seq_length"), metric=METRIC, mode="max", time_attr=TIME_ATTR,
                            max_t=sc.trial.steps, grace_period=sch.grace_period,
                            reduction_factor=sch.reduction_factor, floor_acc=sch.floor_acc,
                            floor_step=sch.floor_step, floor_length=sch.floor_length,
                            cull_dir=str(sc.sweep_dir / CULLED))
    return tune.Tuner(
        trainable,
        param_space=fixed_trial_settings(sc),   # each trial's point comes from the search
        # reuse_actors: a trial starts in the worker process of a finished one (torch, the model's
        # TorchScript and the C++ kernels already loaded) instead of a fresh one
        tune_config=tune.TuneConfig(num_samples=-1, scheduler=scheduler, reuse_actors=True, search_alg=search,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(sc.sweep_dir), verbose=verbose,
                                  callbacks=[*(callbacks or []), RecordedSteps(str(sc.sweep_dir / RECORDED),
                                                                               TIME_ATTR)],
                                  failure_config=tune.FailureConfig(max_failures=sch.max_failures)))


# --- the driver ----------------------------------------------------------------------------------

run_sweep = common.sweep_runner(run_trial, build_tuner, check_trial_configs, report.collect_rows, report.write_report)
main = common.sweep_main("tune.lstm_sweep")

if __name__ == "__main__":
    run_cli(main)
