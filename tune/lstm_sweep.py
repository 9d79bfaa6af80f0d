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

After the grid, each model's T is extended upward (tune/horizon.py: doubling, then bisecting between
the last solved and the first failed T) with --horizon-draws seeds of the best configuration at the
last solved T, one round of trials at a time, until it fails with every draw; the report gives each
horizon as "solved at T_s, failed at T_f with n draws".

Writes <out-dir>/sweeps/<name>/: sweep.json (the flags), tune/ (Ray's experiment state of the grid;
tune-extend-<k>/ of the k-th round of the extension), trials/<run>/
(the trainer's run folders) and, once every trial has ended, the report (tune/report.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from trainers.checkpoint import PREFIX, list_checkpoints, read_meta
from trainers.cli import (UsageError, check_choices, flatten, from_saved, override, parse, require_at_least,
                          require_non_negative, require_positive, require_writable_dir, run_cli)
from trainers.files import write_json_atomic
from trainers.lstm import LSTMConfig, train
from tune import report
from tune.horizon import MODELS, arch, cell_results, next_cell, rnn_init

METRIC = "val/acc"              # what ASHA compares
TIME_ATTR = "step"              # ASHA's clock: the trainer step of each report
ATTEMPTS = "attempts.jsonl"     # one line per start of a trial's trainer (first start or resume)
CULLED = "culled"               # <sweep>/culled/<trial id>: the scheduler's verdict on a trial it culls
RECORDED = "recorded"           # <sweep>/recorded/<trial id>: the last step Tune recorded as the trial started


# --- config ----------------------------------------------------------------------------------

def listing(kind, metavar: str):
    """A tuple flag that takes ``--flag 20 30 50`` or the comma form ``--flag 20,30,50``."""
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, metavar)
            raise ValueError(f"{text!r} is not {what}; give values separated by spaces or commas") from None

    return tyro.constructors.PrimitiveConstructorSpec(
        nargs="*", metavar=f"{metavar} [{metavar} ...]",
        instance_from_str=lambda args: tuple(convert(t.strip()) for a in args for t in a.split(",") if t.strip()),
        is_instance=lambda v: isinstance(v, tuple), str_from_instance=lambda v: [str(x) for x in v])


Ints = Annotated[tuple[int, ...], listing(int, "INT")]
Floats = Annotated[tuple[float, ...], listing(float, "FLOAT")]
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
    horizon_resolution: float = 1.25  # stop bisecting once the first failed T is within this factor of the last solved
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
class Scheduling:
    """scheduling and resources"""
    grace_period: int = 1000  # ASHA: steps before a trial can be stopped
    reduction_factor: float = 3.0  # ASHA: keep the top 1/rf of a grid point's trials at each rung
    floor_acc: float = 0.15  # cull a trial below this val accuracy from --floor-step on (chance: 0.1; 0: off)
    floor_step: int = 750  # the step from which --floor-acc applies
    floor_length: int = 100  # above this T the floor starts later: --floor-step x T / --floor-length, at most --steps / 2 (0: never)
    cpus_per_trial: float = 1.0  # CPUs per trial (fractions allowed)
    gpus_per_trial: float = 0.0  # GPUs per trial (fractions allowed, e.g. 0.25 packs 4 per GPU)
    max_failures: int = 2  # retries of a crashed trial, each from its last checkpoint
    address: str = ""  # join this Ray cluster (host:port, ray://host:port or auto); empty starts a local Ray
    num_cpus: int = 0  # CPUs of the local Ray (0: all of this machine's)


@dataclass
class Output:
    """output"""
    out_dir: str = "runs"  # root folder; the sweep goes to <out-dir>/sweeps/<name>
    name: str = "lstm-sweep"  # sweep name: folder and wandb group (--quick: quick)
    resume: bool = False  # continue the interrupted sweep <name> (Tuner.restore; its saved search flags)
    quick: bool = False  # the quick preset: T in 10 50 100, two draws, short trials (flags given still apply)
    wandb: bool = True  # one offline wandb run per trial plus a summary run; --no-wandb for none
    wandb_project: str = "palgan"  # wandb project


@dataclass
class SweepConfig:
    """Ray Tune sweep of the palindrome trainer: each model's horizon in T."""
    search: Search = field(default_factory=Search)
    trial: Trial = field(default_factory=Trial)
    scheduling: Scheduling = field(default_factory=Scheduling)
    output: Output = field(default_factory=Output)

    def validate(self) -> None:
        check_choices(self)
        s, t, sch, out = self.search, self.trial, self.scheduling, self.output
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
                        (sch.reduction_factor > 1, f"--reduction-factor must be > 1, got {sch.reduction_factor}"),
                        (out.name and "/" not in out.name and not out.name.startswith("."),
                         f"--name must be a plain folder name, got {out.name!r}")):
            if not ok:
                raise UsageError(why)
        require_writable_dir(out.out_dir, "out_dir")
        require_writable_dir(self.sweep_dir, "out_dir")

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output.out_dir).expanduser().resolve() / "sweeps" / self.output.name


# The quick preset: one T both models learn and two beyond the RNN's horizon, where the LSTM with a
# forget bias of 5 solves within a few hundred to a thousand steps. Flags given still apply.
# Its extension stops at T=100 and bisects the RNN's gap to within x2.
QUICK = dict(models=("lstm", "rnn"), lstm_seq_lengths=(10, 50, 100), rnn_seq_lengths=(10, 50, 100),
             forget_biases=(5.0,), num_samples=2, horizon_draws=2, horizon_resolution=2.0, max_seq_length=100,
             steps=2000, eval_every=100, grace_period=300, floor_step=500, val_size=2000, name="quick")
# Flags of a running sweep that --resume takes from the command line, not from sweep.json.
RUNTIME_FLAGS = ("address", "num_cpus", "out_dir", "name", "resume", "quick")


def parse_sweep(argv: Sequence[str] | None, prog: str, description: str) -> SweepConfig:
    """The command line -> a validated SweepConfig; with --quick the preset replaces the defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = [a for a in argv if a in ("--quick", "--no-quick")][-1:] == ["--quick"]
    default = override(SweepConfig(), quick=True, **QUICK) if quick else None
    return parse(SweepConfig, argv, prog=prog, description=description, default=default)


def check_list(values: tuple, name: str, low: float | None = None) -> None:
    flag = "--" + name.replace("_", "-")
    if not values:
        raise UsageError(f"{flag} is empty; give one or more values, e.g. {flag} 20 30 50")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} values must be finite numbers, got {values}")
    bad = [v for v in values if low is not None and v < low]
    if bad:
        raise UsageError(f"{flag} values must be >= {low}, got {bad[0]}")


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
    if report.read_metrics(run_dir).get("finished"):
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
    point = trial.config.get("point", trial.config)   # the grid entry: resolved before the rest of the config
    return f"{point['sweep_model']}-T{point['seq_length']}-{trial.trial_id}"


# --- the search space and its resources ----------------------------------------------------------

def fixed_trial_settings(sc: SweepConfig) -> dict:
    """LSTMConfig fields shared by every trial (in the param space, so --resume keeps them)."""
    t, out = sc.trial, sc.output
    return dict(steps=t.steps, eval_every=t.eval_every, checkpoint_every=t.eval_every, batch_size=t.batch_size,
                val_size=t.val_size, input_encoding=t.input_encoding, solved_acc=t.solved_acc,
                stop_when_solved=t.solve_patience, out_dir=str(sc.sweep_dir / "trials"), wandb=out.wandb,
                wandb_project=out.wandb_project, wandb_group=out.name, wandb_job_type="sweep-trial",
                progress=False, num_threads=max(1, int(sc.scheduling.cpus_per_trial)))


def point(model: str, t: int, draw: int, seed: int, forget_bias: float, **fixed) -> dict:
    """One trial's entry: its sweep model (and the trainer's --model and --rnn-init), T, draw, seed."""
    return {"sweep_model": model, "model": arch(model), "rnn_init": rnn_init(model), "seq_length": t, "draw": draw,
            "seed": seed, "forget_bias": forget_bias if arch(model) == "lstm" else LSTMConfig().model.forget_bias,
            **fixed}


def grid_points(sc: SweepConfig) -> list[dict]:
    """One entry per trial: (model, T, draw k) with seed + k, the LSTM's draw k with the k-th forget
    bias in turn. The costliest grid points come first (longest T, the LSTM before the RNN), so the
    long trials do not all start at the end; a grid point's draws are next to each other, so ASHA
    compares them early."""
    biases = sc.search.forget_biases
    points = [point(m, t, k, sc.trial.seed + k, biases[k % len(biases)])
              for m in dict.fromkeys(sc.search.models) for t in lengths_of(sc, m) for k in range(sc.search.num_samples)]
    return sorted(points, key=lambda p: (-p["seq_length"], p["sweep_model"], p["draw"]))


def extension_points(sc: SweepConfig, rows: list[dict]) -> list[dict]:
    """The next round past the grid (tune/horizon.py's rule on each model's results so far): for
    each model whose horizon is not found yet, the draws of its next T, each a new seed of the best
    configuration (hidden_dim, lr, forget bias) at its longest solved T. Empty: every horizon found."""
    s, points = sc.search, []
    if not s.horizon_draws:
        return points
    for model in dict.fromkeys(s.models):
        results = cell_results(rows, model, report.SOLVED)
        cell = next_cell(results, s.horizon_draws, s.horizon_resolution, s.max_seq_length)
        if cell is None:
            continue
        t, add = cell
        t_s = max(x for x, (solved, _) in results.items() if solved)
        best = report.best_per_cell(rows)[model, t_s]
        ran = results.get(t, (0, 0))[1]
        points += [point(model, t, k, sc.trial.seed + k, best["forget_bias"] or 0.0, hidden_dim=best["hidden_dim"],
                         lr=best["lr"]) for k in range(ran, ran + add)]
    return points


def check_trial_configs(sc: SweepConfig) -> None:
    """Validate a trial config at each corner of the space before any worker starts."""
    fixed = fixed_trial_settings(sc)
    for point in grid_points(sc):
        for hidden in hidden_dims(sc):
            for lr in (sc.search.lr_min, sc.search.lr_max):
                trial_config({**fixed, **point, "hidden_dim": hidden, "lr": lr}, "check").validate()


def check_points(sc: SweepConfig, points: list[dict]) -> None:
    for p in points:
        trial_config({**fixed_trial_settings(sc), **p}, "check").validate()


def trainable(sc: SweepConfig):
    from ray import tune

    return tune.with_resources(run_trial, {"cpu": sc.scheduling.cpus_per_trial, "gpu": sc.scheduling.gpus_per_trial})


def build_tuner(sc: SweepConfig, callbacks=None, verbose: int = 1, points: list[dict] | None = None,
                name: str = "tune"):
    """The Tuner of the grid, or with ``points`` (each with its hidden_dim and lr) of one round of
    the extension, as the experiment ``name``."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tune.asha import GroupedASHA
    from tune.record import RecordedSteps

    s, sch = sc.search, sc.scheduling
    sampled = {"hidden_dim": tune.choice(hidden_dims(sc)), "lr": tune.loguniform(s.lr_min, s.lr_max)}
    param_space = {   # one grid entry per trial; its fields are copied to the top level of the trial's config
        "point": tune.grid_search(points or grid_points(sc)),
        **{key: tune.sample_from(lambda config, key=key: config["point"][key])
           for key in ("sweep_model", "model", "rnn_init", "seq_length", "draw", "seed", "forget_bias",
                       *(sampled if points else ()))},
        **({} if points else sampled),
        **fixed_trial_settings(sc),
    }
    scheduler = GroupedASHA(("sweep_model", "seq_length"), metric=METRIC, mode="max", time_attr=TIME_ATTR,
                            max_t=sc.trial.steps, grace_period=sch.grace_period,
                            reduction_factor=sch.reduction_factor, floor_acc=sch.floor_acc,
                            floor_step=sch.floor_step, floor_length=sch.floor_length,
                            cull_dir=str(sc.sweep_dir / CULLED))
    return tune.Tuner(
        trainable(sc),
        param_space=param_space,
        # reuse_actors: a trial starts in the worker process of a finished one (torch, the model's
        # TorchScript and the C++ kernels already loaded) instead of a fresh one
        tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler, reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=sc.trial.seed),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=str(sc.sweep_dir), verbose=verbose,
                                  callbacks=[*(callbacks or []), RecordedSteps(str(sc.sweep_dir / RECORDED),
                                                                               TIME_ATTR)],
                                  failure_config=tune.FailureConfig(max_failures=sch.max_failures)))


# --- the driver ----------------------------------------------------------------------------------

def connect_ray(sc: SweepConfig) -> bool:
    """Start a local Ray or join ``--address`` (token auth, one-line errors, a watch on the head:
    tune/cluster.py); returns whether this call started it (and so must shut it down). Reuses a
    session that is already up (tests share one). Ray is imported only here: joining a cluster
    with a token must set up auth before Ray reads its settings."""
    from tune.cluster import check_reachable, join

    address = sc.scheduling.address
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        if address:
            check_reachable(address)
        return False
    if address:
        join(address)
        return True
    import ray

    # address="local": a Ray of its own, even where another one runs on this machine
    ray.init(address="local", num_cpus=sc.scheduling.num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=256 * 1024 ** 2)
    return True


def check_resources(sc: SweepConfig) -> None:
    """A trial that fits no node would wait forever: say so now."""
    import ray

    total = ray.cluster_resources()
    for key, need, flag in (("CPU", sc.scheduling.cpus_per_trial, "--cpus-per-trial"),
                            ("GPU", sc.scheduling.gpus_per_trial, "--gpus-per-trial")):
        if need > 0 and total.get(key, 0) < need:
            raise UsageError(f"{flag} {need:g} but the Ray cluster has {total.get(key, 0):g} {key}s; "
                             f"lower {flag} or join a larger cluster with --address")


def load_for_resume(sc: SweepConfig) -> SweepConfig:
    """--resume: the saved sweep's flags, with this command's runtime flags on top."""
    saved = sc.sweep_dir / "sweep.json"
    if not saved.exists():
        raise UsageError(f"--resume: no sweep at {sc.sweep_dir}; run without --resume to start it, "
                         "or pass the --out-dir/--name it was started with")
    try:
        stored = json.loads(saved.read_text())
        base = from_saved(SweepConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    except (ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"--resume: {saved} is unreadable ({err.__class__.__name__}); "
                         "start the sweep again under another --name") from None
    now = flatten(sc)
    return override(base, **{k: now[k] for k in RUNTIME_FLAGS})


def run_sweep(sc: SweepConfig, callbacks=None, verbose: int = 1) -> dict:
    """Run (or resume) the sweep and, once every trial has ended, write its report. Returns
    ``{"sweep_dir", "trials", "unfinished", "errors", "rows"}``; ``unfinished > 0`` after an interrupt."""
    t0 = time.perf_counter()
    sc.validate()
    sweep_dir = sc.sweep_dir
    if sc.output.resume:
        sc = load_for_resume(sc)
        sc.validate()
    elif (sweep_dir / "sweep.json").exists() or (sweep_dir / "tune").exists():
        raise UsageError(f"{sweep_dir} already holds a sweep; pass --resume to continue it or choose another --name")
    check_trial_configs(sc)
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"   # trials keep the driver's working directory
    started = connect_ray(sc)
    try:
        check_resources(sc)
        from ray.tune import Tuner

        done = report.experiments(sweep_dir)   # the rounds already started: the grid, then the extension's
        if sc.output.resume:
            if not Tuner.can_restore(str(sweep_dir / "tune")):
                raise UsageError(f"--resume: {sweep_dir / 'tune'} holds no Ray Tune state to restore; "
                                 "start the sweep again under another --name")
            tuner = Tuner.restore(str(done[-1]), trainable(sc), resume_errored=True)   # the last round started
        else:
            write_json_atomic(sweep_dir / "sweep.json", flatten(sc))
            tuner = build_tuner(sc, callbacks, verbose)
        while True:   # the grid (or the round resumed), then the extension one round at a time
            tuner.fit()
            rows = report.collect_rows(sweep_dir)
            unfinished = sum(r["status"] in report.UNFINISHED for r in rows)
            points = [] if unfinished else extension_points(sc, rows)
            if not points:
                break
            check_points(sc, points)
            tuner = build_tuner(sc, callbacks, verbose, points, name=f"tune-extend-{len(report.experiments(sweep_dir))}")
    finally:
        if started:
            import ray
            ray.shutdown()
    if unfinished == 0:
        report.write_report(sweep_dir, rows, wall_s=time.perf_counter() - t0)
    return {"sweep_dir": sweep_dir, "trials": len(rows), "unfinished": unfinished,
            "errors": sum(r["status"] == "failed" for r in rows), "rows": rows}


def main(argv=None) -> dict:
    sc = parse_sweep(argv, prog="tune/lstm_sweep.py", description=__doc__.splitlines()[0])
    t0 = time.perf_counter()
    outcome = run_sweep(sc)
    wall = time.perf_counter() - t0
    if outcome["unfinished"]:
        sys.stderr.write(f"lstm_sweep: interrupted with {outcome['unfinished']} of {outcome['trials']} trials "
                         f"unfinished; continue with the same command plus --resume\n")
        sys.exit(130)
    print((Path(outcome["sweep_dir"]) / "table.md").read_text())
    print(f"{outcome['trials']} trials ({outcome['errors']} failed) in {wall:.0f}s -> {outcome['sweep_dir']}")
    return outcome


if __name__ == "__main__":
    # Import ourselves as tune.lstm_sweep so Ray pickles run_trial and GroupedASHA by module name.
    from tune.lstm_sweep import main as sweep_main
    run_cli(sweep_main)
