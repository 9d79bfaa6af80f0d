"""Ray Tune sweep of the palindrome trainer: how far back each model remembers (its horizon in T).

    python tune/lstm_sweep.py                                 # the experiment: <= 60 min on a 2-core CPU
    python tune/lstm_sweep.py --quick                         # <= 5 min: one T the LSTM solves and the RNN not
    python tune/lstm_sweep.py --input-encoding scalar --name lstm-sweep-scalar   # the 1-d input's map
    python tune/lstm_sweep.py --address HEAD:6379 --gpus-per-trial 0.25   # join a running Ray cluster
    python tune/lstm_sweep.py --quick --resume                # continue an interrupted sweep (Ctrl-C once)

Each trial is ``trainers.lstm.train(LSTMConfig)``, the CLI's own loop: it reports to Tune after
every validation pass with a Tune checkpoint holding a copy of the trainer's checkpoint, so ASHA,
FailureConfig retries and ``--resume`` continue a trial where it stopped (via ``cfg.resume``).
A grid point (model, T) gets --num-samples draws of hidden_dim and lr (and, taken in turn, the
LSTM's forget-gate bias), each with its own seed. A trial ends as soon as its question is answered:
solved (>= --solved-acc at --solve-patience validations in a row), culled by ASHA against the other
draws of its grid point or for staying below --floor-acc, or at --steps. Every trial leaves a
metrics.json and a finished wandb run that say which.

Writes <out-dir>/sweeps/<name>/{results.csv, table.md, figures/horizon.png, best.json, sweep.json}
plus tune/ (Ray's experiment state) and trials/<run>/ (each trainer run folder, with its wandb run).
A model's horizon is the largest T at which some draw reached 99% on the fixed validation set.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.checkpoint import PREFIX, list_checkpoints, write_json_atomic
from trainers.cli import UsageError, arg, parse_config, require_at_least, run_cli
from trainers.figures import plt, save_figure
from trainers.lstm import NUM_CLASSES, LSTMConfig, train

MODELS = ("lstm", "rnn")
LSTM_LENGTHS = "20,30,50,100,200,300,400"  # the default grids of T: each reaches past its model's horizon
RNN_LENGTHS = "10,20,30,40,50,60,80"
QUICK_LENGTHS = "10,50,100"
MODEL_LABELS = {"lstm": "LSTM", "rnn": "Vanilla RNN"}
METRIC = "val/acc"              # what ASHA compares and the table reports
TIME_ATTR = "step"              # ASHA's clock: the trainer step of each report
POINTER = "tune_pointer.json"   # written next to the trainer checkpoint inside a Tune checkpoint
ATTEMPTS = "attempts.jsonl"     # one line per start of a trial's trainer (first start or resume)
CULLED = "culled"               # <sweep>/culled/<trial id>: the scheduler's verdict on a trial it culls
CHANCE = 1.0 / NUM_CLASSES


@dataclass
class SweepConfig:
    # search space
    models: str = arg("lstm,rnn", "comma-separated models to sweep (lstm, rnn)", "search")
    lstm_seq_lengths: str = arg(LSTM_LENGTHS, "the LSTM's grid of palindrome lengths T", "search")
    rnn_seq_lengths: str = arg(RNN_LENGTHS, "the RNN's grid of palindrome lengths T", "search")
    seq_lengths: str = arg("", "one grid of T for every model, in place of the two above", "search")
    hidden_dims: str = arg("32,64", "hidden sizes drawn from (uniformly)", "search")
    lr_min: float = arg(7e-4, "lower end of the log-uniform learning-rate range", "search")
    lr_max: float = arg(2e-3, "upper end of the log-uniform learning-rate range", "search")
    forget_biases: str = arg("3,5,7", "LSTM forget-gate biases; a grid point's draws take them in turn",
                             "search")
    num_samples: int = arg(3, "draws per grid point (model, T), each with its own seed", "search")
    # every trial (the rest of LSTMConfig keeps the trainer's defaults)
    steps: int = arg(3000, "most training steps of a trial", "trial")
    eval_every: int = arg(250, "steps between validation passes = Tune reports = checkpoints", "trial")
    batch_size: int = arg(128, "sequences per step", "trial")
    val_size: int = arg(5000, "validation sequences per T (a fixed set)", "trial")
    solved_acc: float = arg(0.999, "validation accuracy that counts as solved", "trial")
    solve_patience: int = arg(2, "a trial ends as solved after this many validations in a row at "
                                 ">= --solved-acc (0: never ends early)", "trial")
    input_encoding: str = arg("onehot", "digit encoding of every trial (scalar: the course template's 1-d input)",
                              "trial", ("onehot", "scalar"))
    seed: int = arg(0, "trainer seed of each grid point's first draw (draw k: seed + k), and seed of the "
                       "(hidden_dim, lr) draws", "trial")
    # scheduling and resources
    grace_period: int = arg(1000, "ASHA: steps before a trial can be stopped", "scheduling")
    reduction_factor: float = arg(3.0, "ASHA: keep the top 1/rf of a grid point's trials at each rung", "scheduling")
    floor_acc: float = arg(0.15, "cull a trial still below this validation accuracy at --floor-step "
                                 "(chance is 0.1; 0 turns it off)", "scheduling")
    floor_step: int = arg(750, "the step from which --floor-acc applies", "scheduling")
    cpus_per_trial: float = arg(1.0, "CPUs per trial (fractions allowed)", "scheduling")
    gpus_per_trial: float = arg(0.0, "GPUs per trial (fractions allowed, e.g. 0.25 packs 4 per GPU)", "scheduling")
    max_failures: int = arg(2, "retries of a crashed trial, each from its last checkpoint", "scheduling")
    address: str = arg("", "join this Ray cluster (host:port, ray://host:port or auto); "
                           "empty starts a local Ray", "scheduling")
    num_cpus: int = arg(0, "CPUs of the local Ray (0: all of this machine's)", "scheduling")
    # output
    out_dir: str = arg("runs", "root folder; the sweep goes to <out-dir>/sweeps/<name>", "output")
    name: str = arg("lstm-sweep", "sweep name: folder and wandb group (--quick: quick)", "output")
    resume: bool = arg(False, "continue the interrupted sweep <name> with Tuner.restore "
                              "(finished trials are not rerun; its search flags are reused)", "output")
    quick: bool = arg(False, "the quick preset: T in 10,50,100, two draws, short trials", "output")
    wandb: bool = arg(True, "one offline wandb run per trial plus a summary run; --no-wandb for none",
                      "output")
    wandb_project: str = arg("palgan", "wandb project", "output")

    def validate(self) -> None:
        for model in parse_models(self.models):
            lengths_of(self, model)
        parse_ints(self.hidden_dims, "hidden_dims", low=1)
        parse_floats(self.forget_biases, "forget_biases")
        if not 0 < self.solved_acc <= 1:
            raise UsageError(f"--solved-acc must lie in (0, 1], got {self.solved_acc}")
        if not 0 <= self.floor_acc < 1:
            raise UsageError(f"--floor-acc must lie in [0, 1), got {self.floor_acc}")
        require_at_least(self.solve_patience, 0, "solve_patience")
        require_at_least(self.floor_step, 1, "floor_step")
        for name in ("lr_min", "lr_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        if not self.lr_min < self.lr_max:
            raise UsageError(f"the lr range is empty or inverted (--lr-min {self.lr_min:g} >= --lr-max "
                             f"{self.lr_max:g}); give --lr-min below --lr-max")
        for name in ("num_samples", "steps", "eval_every", "batch_size", "val_size", "grace_period"):
            require_at_least(getattr(self, name), 1, name)
        require_at_least(self.max_failures, 0, "max_failures")
        require_at_least(self.num_cpus, 0, "num_cpus")
        if self.grace_period > self.steps:
            raise UsageError(f"--grace-period ({self.grace_period}) must not exceed --steps ({self.steps})")
        if not self.reduction_factor > 1:
            raise UsageError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if not (math.isfinite(self.cpus_per_trial) and self.cpus_per_trial > 0):
            raise UsageError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if not (math.isfinite(self.gpus_per_trial) and self.gpus_per_trial >= 0):
            raise UsageError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UsageError(f"--name must be a plain folder name, got {self.name!r}")

    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir).resolve() / "sweeps" / self.name


# The quick preset overrides only what differs from the full sweep, and only where the user kept
# the default: one T both models learn and two beyond the RNN's horizon, where the LSTM with a
# forget bias of 5 solves within a few hundred to a thousand steps.
QUICK = dict(lstm_seq_lengths=QUICK_LENGTHS, rnn_seq_lengths=QUICK_LENGTHS, forget_biases="5", num_samples=2,
             steps=2000, eval_every=100, grace_period=300, floor_step=500, val_size=2000, name="quick")
# Flags of a running sweep that --resume takes from the command line, not from sweep.json.
RUNTIME_FLAGS = ("address", "num_cpus", "out_dir", "name", "resume", "quick")


def apply_quick(sc: SweepConfig) -> SweepConfig:
    if not sc.quick:
        return sc
    defaults = SweepConfig()
    return replace(sc, **{k: v for k, v in QUICK.items() if getattr(sc, k) == getattr(defaults, k)})


def parse_models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise UsageError("--models is empty; give a comma-separated list such as lstm,rnn")
    for m in models:
        if m not in MODELS:
            raise UsageError(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    return list(dict.fromkeys(models))


def lengths_of(sc: SweepConfig, model: str) -> list[int]:
    """The grid of T for ``model``: --seq-lengths when given, else the model's own grid."""
    if sc.seq_lengths:
        return parse_ints(sc.seq_lengths, "seq_lengths", 2)
    name = f"{model}_seq_lengths"
    return parse_ints(getattr(sc, name), name, 2)


def all_lengths(sc: SweepConfig) -> list[int]:
    return sorted({t for m in parse_models(sc.models) for t in lengths_of(sc, m)})


def parse_floats(text: str, name: str) -> list[float]:
    flag = "--" + name.replace("_", "-")
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} must be a comma-separated list of finite numbers such as 1,3,5, got {text!r}")
    return values


def parse_ints(text: str, name: str, low: int) -> list[int]:
    flag = "--" + name.replace("_", "-")
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag} is empty; give a comma-separated list of integers such as 5,10,20")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if v < low]
    if bad:
        raise UsageError(f"{flag} values must be >= {low}, got {bad[0]}")
    return sorted(set(values))


# --- one trial (runs inside a Ray worker) --------------------------------------------------------

def run_name(model: str, seq_length: int, hidden_dim: int, trial_id: str) -> str:
    return f"{model}-T{seq_length}-h{hidden_dim}-{trial_id}"


def trial_config(config: dict, trial_id: str) -> LSTMConfig:
    """The trainer config of one trial: the sampled point plus the sweep's fixed settings; draw k
    of a grid point trains with seed + k."""
    fixed = dict(config["fixed"])
    fixed["seed"] = fixed.get("seed", 0) + config.get("draw", 0)
    cfg = LSTMConfig(**fixed, model=config["model"], seq_length=config["seq_length"],
                     hidden_dim=config["hidden_dim"], lr=config["lr"],
                     forget_bias=config.get("forget_bias", LSTMConfig.forget_bias),
                     run_name=run_name(config["model"], config["seq_length"], config["hidden_dim"], trial_id))
    cfg.checkpoint_every = cfg.eval_every   # a checkpoint behind every report
    return cfg


def cull_marker(cfg: LSTMConfig, trial_id: str) -> Path:
    """Where the scheduler leaves its verdict for a trial it culls: <sweep>/culled/<trial id>."""
    return Path(cfg.out_dir).parent / CULLED / trial_id


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX):])


def restore_trainer_checkpoint(cfg: LSTMConfig, tune_ckpt_dir: Path | None) -> int:
    """Pick where a (re)started trial continues; sets ``cfg.resume`` and returns the step.

    The trainer's own latest checkpoint wins when it is at least as recent as the one Tune hands
    back: Tune registers a reported checkpoint asynchronously, so after a Ctrl-C or a crash it may
    restore the previous one although the report after it was received (continuing from Tune's
    would train and report those steps twice). Tune's copy is used when the run folder lacks it
    (a trial moved to another node, or a deleted folder); a copy that Tune recorded but did not finish
    writing (the head died meanwhile) is ignored."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    local = list_checkpoints(ckpt_dir)
    restored = None
    if tune_ckpt_dir is not None:
        try:
            restored = tune_ckpt_dir / json.loads((tune_ckpt_dir / POINTER).read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):   # Tune's copy was cut short: the head died
            restored = None                                  # while it persisted it; use the run folder's
        if restored is not None and not (restored / "palgan.json").is_file():
            restored = None
    if local and (restored is None or checkpoint_step(local[-1]) >= checkpoint_step(restored)):
        start = checkpoint_step(local[-1])
    elif restored is not None:
        tmp = ckpt_dir / f".tmp-{restored.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(restored, tmp)
        os.replace(tmp, ckpt_dir / restored.name)
        start = checkpoint_step(restored)
    else:
        start = 0
    (cfg.run_dir / "metrics.json").unlink(missing_ok=True)   # written again when the trial ends
    cfg.resume = start > 0
    return start


def log_attempt(cfg: LSTMConfig, start: int) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps({"from_step": start, "time": time.time(), "pid": os.getpid()}) + "\n")


def report_to_tune(step: int, metrics: dict, ckpt: Path | None) -> None:
    """The trainer's ``on_eval``: one Tune report per validation pass, with a copy of the
    trainer's checkpoint as the Tune checkpoint (small; portable across nodes and restores)."""
    from ray.tune import Checkpoint, report

    scalars = {k: float(v) for k, v in metrics.items() if k != "step"}
    scalars[TIME_ATTR] = int(step)
    if ckpt is None:
        report(scalars)
        return
    with tempfile.TemporaryDirectory(prefix="palgan-tune-ckpt-") as tmp:
        shutil.copytree(ckpt, Path(tmp) / ckpt.name)
        (Path(tmp) / POINTER).write_text(json.dumps({"checkpoint": ckpt.name, "step": int(step),
                                                     "run_dir": str(ckpt.parent.parent)}))
        report(scalars, checkpoint=Checkpoint.from_directory(tmp))


def run_trial(config: dict) -> None:
    """The Tune function trainable: build the trial's LSTMConfig and call the trainer."""
    from ray.tune import get_checkpoint, get_context

    trial_id = get_context().get_trial_id()
    cfg = trial_config(config, trial_id)
    checkpoint = get_checkpoint()
    if checkpoint is None:
        start = restore_trainer_checkpoint(cfg, None)
    else:
        with checkpoint.as_directory() as d:
            start = restore_trainer_checkpoint(cfg, Path(d))
    log_attempt(cfg, start)
    marker = cull_marker(cfg, trial_id)

    reported = []

    def on_eval(step: int, metrics: dict, ckpt: Path | None) -> str | None:
        """Report, then end the run if the scheduler culled it: Tune's report returns only once the
        scheduler has judged this result, and the trainer then ends the run as it would any other
        (metrics.json, figures, a finished wandb run) instead of being killed mid-run."""
        from tune.asha import CULLED_BY_ASHA

        report_to_tune(step, metrics, ckpt)
        reported.append(step)
        return (marker.read_text().strip() or CULLED_BY_ASHA) if marker.exists() else None

    final = train(cfg, on_eval=on_eval)
    if not reported and final.get("steps", 0) > 0:
        # restarted at its last checkpoint (its head died after the run's end but before Tune had
        # recorded that report): nothing was left to train, so tell Tune where the run ended
        last = list_checkpoints(cfg.run_dir / "checkpoints")
        scalars = {k: final[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc") if k in final}
        report_to_tune(int(final["steps"]), scalars, last[-1] if last else None)


def trial_dirname(trial) -> str:
    point = trial.config.get("point", trial.config)   # the grid entry: resolved before the rest of the config
    return f"{point['model']}-T{point['seq_length']}-{trial.trial_id}"


# --- the driver ----------------------------------------------------------------------------------

def connect_ray(sc: SweepConfig) -> bool:
    """Start a local Ray or join ``--address`` (token auth, one-line errors, a watch on the head:
    tune/cluster.py); returns whether this call started it (and so must shut it down). Reuses a
    session that is already up (tests share one)."""
    import ray

    from tune.cluster import check_reachable, join

    if ray.is_initialized():
        if sc.address:
            check_reachable(sc.address)
        return False
    if sc.address:
        join(sc.address)
    else:
        # address="local": a Ray of its own, even where another one runs on this machine
        ray.init(address="local", num_cpus=sc.num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=256 * 1024 ** 2)
    return True


def check_resources(sc: SweepConfig) -> None:
    """A trial that fits no node would wait forever: say so now."""
    import ray

    total = ray.cluster_resources()
    for key, need, flag in (("CPU", sc.cpus_per_trial, "--cpus-per-trial"),
                            ("GPU", sc.gpus_per_trial, "--gpus-per-trial")):
        if need > 0 and total.get(key, 0) < need:
            raise UsageError(f"{flag} {need:g} but the Ray cluster has {total.get(key, 0):g} {key}s; "
                             f"lower {flag} or join a larger cluster with --address")


def fixed_trial_settings(sc: SweepConfig) -> dict:
    """LSTMConfig fields shared by every trial (stored in the param space, so --resume keeps them)."""
    return dict(steps=sc.steps, eval_every=sc.eval_every, batch_size=sc.batch_size, val_size=sc.val_size,
                input_encoding=sc.input_encoding, seed=sc.seed, out_dir=str(sc.sweep_dir / "trials"), wandb=sc.wandb,
                wandb_project=sc.wandb_project, wandb_group=sc.name, wandb_job_type="sweep-trial", progress=False,
                solved_acc=sc.solved_acc, stop_when_solved=sc.solve_patience,
                num_threads=max(1, int(sc.cpus_per_trial)))


def grid_points(sc: SweepConfig) -> list[dict]:
    """One entry per trial: (model, T, draw k), the LSTM's draw k with the k-th forget bias in turn.
    The costliest grid points come first (longest T, the LSTM before the RNN), so the long trials
    do not all start at the end; a grid point's draws are next to each other, so ASHA compares
    them early."""
    biases = parse_floats(sc.forget_biases, "forget_biases")
    points = [{"model": m, "seq_length": t, "draw": k,
               "forget_bias": biases[k % len(biases)] if m == "lstm" else LSTMConfig.forget_bias}
              for m in parse_models(sc.models) for t in lengths_of(sc, m) for k in range(sc.num_samples)]
    return sorted(points, key=lambda p: (-p["seq_length"], p["model"], p["draw"]))


def check_trial_configs(sc: SweepConfig) -> None:
    """Validate a trial config at each corner of the space before any worker starts."""
    fixed = fixed_trial_settings(sc)
    for point in grid_points(sc):
        for hidden in parse_ints(sc.hidden_dims, "hidden_dims", 1):
            for lr in (sc.lr_min, sc.lr_max):
                trial_config({**point, "fixed": fixed, "hidden_dim": hidden, "lr": lr}, "check").validate()


def build_tuner(sc: SweepConfig, callbacks=None, verbose: int = 1):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tune.asha import GroupedASHA

    # one grid entry per trial; its fields are copied to the top level of the trial's config
    param_space = {
        "point": tune.grid_search(grid_points(sc)),
        **{key: tune.sample_from(lambda spec, key=key: spec.config.point[key])
           for key in ("model", "seq_length", "draw", "forget_bias")},
        "hidden_dim": tune.choice(parse_ints(sc.hidden_dims, "hidden_dims", 1)),
        "lr": tune.loguniform(sc.lr_min, sc.lr_max),
        "fixed": fixed_trial_settings(sc),
    }
    scheduler = GroupedASHA(("model", "seq_length"), metric=METRIC, mode="max", time_attr=TIME_ATTR,
                            max_t=sc.steps, grace_period=sc.grace_period,
                            reduction_factor=sc.reduction_factor, floor_acc=sc.floor_acc,
                            floor_step=sc.floor_step, cull_dir=str(sc.sweep_dir / CULLED))
    return tune.Tuner(
        trainable(sc),
        param_space=param_space,
        # reuse_actors: a trial starts in the worker process of a finished one (torch, the model's
        # TorchScript and the C++ kernels already loaded) instead of a fresh one
        tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler, reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=sc.seed),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sc.sweep_dir), verbose=verbose, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def trainable(sc: SweepConfig):
    from ray import tune

    return tune.with_resources(run_trial, {"cpu": sc.cpus_per_trial, "gpu": sc.gpus_per_trial})


def load_for_resume(sc: SweepConfig) -> SweepConfig:
    """--resume: the saved sweep's flags, with this command's runtime flags on top."""
    saved = sc.sweep_dir / "sweep.json"
    if not saved.exists():
        raise UsageError(f"--resume: no sweep at {sc.sweep_dir}; run without --resume to start it, "
                         "or pass the --out-dir/--name it was started with")
    try:
        stored = json.loads(saved.read_text())
        known = {f.name for f in fields(SweepConfig)}
        base = SweepConfig(**{k: v for k, v in stored.items() if k in known})
    except (ValueError, TypeError) as err:
        raise UsageError(f"--resume: {saved} is unreadable ({err.__class__.__name__}); "
                         "start the sweep again under another --name") from None
    return replace(base, **{k: getattr(sc, k) for k in RUNTIME_FLAGS})


def run_sweep(sc: SweepConfig, callbacks=None, verbose: int = 1) -> dict:
    """Run (or resume) the sweep and write its outputs. Returns
    ``{"sweep_dir", "trials", "unfinished", "rows"}``; ``unfinished > 0`` after an interrupt."""
    t0 = time.perf_counter()
    sc = apply_quick(sc)
    sc.validate()
    sweep_dir = sc.sweep_dir
    if sc.resume:
        sc = load_for_resume(sc)
        sc.validate()
    elif (sweep_dir / "sweep.json").exists() or (sweep_dir / "tune").exists():
        raise UsageError(f"{sweep_dir} already holds a sweep; pass --resume to continue it "
                         "or choose another --name")
    check_trial_configs(sc)
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"   # trials keep the driver's working directory
    # A forced state snapshot after every num_to_keep checkpoints is what keeps --resume exact;
    # Tune warns about it at small --eval-every: the warning has nothing to act on.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = connect_ray(sc)
    try:
        check_resources(sc)
        if sc.resume:
            from ray.tune import Tuner
            if not Tuner.can_restore(str(sweep_dir / "tune")):
                raise UsageError(f"--resume: {sweep_dir / 'tune'} holds no Ray Tune state to restore; "
                                 "start the sweep again under another --name")
            tuner = Tuner.restore(str(sweep_dir / "tune"), trainable(sc), resume_errored=True)
        else:
            write_json_atomic(sweep_dir / "sweep.json", asdict(sc))
            tuner = build_tuner(sc, callbacks, verbose)
        tuner.fit()
    finally:
        if started:
            import ray
            ray.shutdown()
    rows = collect_rows(sweep_dir / "tune", sc)
    unfinished = sum(r["status"] in ("pending", "running", "paused") for r in rows)
    if unfinished == 0:
        write_outputs(rows, sc, wall_s=time.perf_counter() - t0)
    return {"sweep_dir": sweep_dir, "trials": len(rows), "unfinished": unfinished,
            "errors": sum(r["status"] == "failed" for r in rows), "rows": rows}


# --- outputs -------------------------------------------------------------------------------------

SOLVED = 0.99   # validation accuracy that defines a model's horizon and each trial's steps_to_99
RESULT_COLUMNS = ("trial_id", "model", "seq_length", "draw", "hidden_dim", "lr", "forget_bias", "status", "steps",
                  "best_val_acc", "best_step", "steps_to_99", "steps_to_solve", "val_acc", "val_loss", "train_acc",
                  "train_loss", "time_s", "run_dir")
# flags of a trial's config that best.json's command leaves out (where the rerun writes, and how it shows)
NOT_REPRODUCED = ("out_dir", "run_name", "wandb_group", "wandb_job_type", "progress", "resume")


def read_metrics(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def collect_rows(experiment_dir: Path, sc: SweepConfig) -> list[dict]:
    """One row per trial, read back from Tune's experiment state on disk (its config, last and
    best reported metrics) and from the trainer's metrics.json (how it ended)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    rows = []
    for trial in analysis.trials:
        config, last = trial.config, trial.last_result or {}
        history = analysis.trial_dataframes.get(trial.trial_id)
        cfg = trial_config(config, trial.trial_id)
        row = {"trial_id": trial.trial_id, "model": config["model"], "seq_length": config["seq_length"],
               "draw": config.get("draw", 0), "hidden_dim": config["hidden_dim"], "lr": config["lr"],
               "forget_bias": cfg.forget_bias if cfg.model == "lstm" else None, "run_dir": str(cfg.run_dir)}
        if history is not None and METRIC in history and len(history):
            accs, steps = history[METRIC].astype(float).values, history[TIME_ATTR].astype(int).values
            best = int(accs.argmax())
            reached = [int(s) for a, s in zip(accs, steps) if a >= SOLVED]
            row.update(best_val_acc=float(accs[best]), best_step=int(steps[best]),
                       steps_to_99=min(reached) if reached else None)
        metrics = read_metrics(cfg.run_dir)
        row.update(steps=last.get(TIME_ATTR), val_acc=last.get("val/acc"), val_loss=last.get("val/loss"),
                   train_acc=last.get("train/acc"), train_loss=last.get("train/loss"),
                   time_s=round(float(last.get("time_total_s", 0.0)), 1),
                   steps_to_solve=metrics.get("steps_to_solve") if metrics.get("stop_reason") == "solved" else None)
        row["status"] = ("failed" if trial.status == "ERROR" else
                         trial.status.lower() if trial.status != "TERMINATED" else
                         metrics.get("stop_reason", "stopped without a record"))
        rows.append({k: row.get(k) for k in RESULT_COLUMNS})
    rows.sort(key=lambda r: (r["model"], r["seq_length"], r["draw"], r["trial_id"]))
    return rows


def best_per_cell(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(model, T) -> its best trial: the highest best_val_acc, then the fewest steps to 99%."""
    def rank(r):
        return (r["best_val_acc"], -(r["steps_to_99"] or math.inf))

    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r["best_val_acc"] is None:
            continue
        key = (r["model"], r["seq_length"])
        if key not in best or rank(r) > rank(best[key]):
            best[key] = r
    return best


def horizons(rows: list[dict], sc: SweepConfig) -> dict[str, dict]:
    """model -> its horizon: the largest T of its grid at which some trial reached SOLVED, that
    trial, and the next T of the grid beyond it with its best accuracy (None: the grid ends there)."""
    best = best_per_cell(rows)
    out = {}
    for model in swept_models(sc):
        lengths = lengths_of(sc, model)
        solved = [t for t in lengths if (model, t) in best and best[model, t]["best_val_acc"] >= SOLVED]
        horizon = max(solved) if solved else None
        beyond = [t for t in lengths if horizon is None or t > horizon]
        nxt = min(beyond) if beyond else None
        out[model] = {"horizon": horizon, "trial": best.get((model, horizon)), "next": nxt,
                      "next_acc": best[model, nxt]["best_val_acc"] if (model, nxt) in best else None,
                      "grid": lengths}
    return out


def swept_models(sc: SweepConfig) -> list[str]:
    return [m for m in ("rnn", "lstm") if m in parse_models(sc.models)]


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def config_text(r: dict) -> str:
    fb = "" if r["forget_bias"] is None else f", forget bias {r['forget_bias']:g}"
    return f"hidden {r['hidden_dim']}, lr {r['lr']:.2g}{fb}, seed draw {r['draw']}"


def horizon_rows(rows: list[dict], sc: SweepConfig) -> tuple[list[str], list[list[str]]]:
    """Each model's horizon with the config that got there, and what happened one T beyond."""
    columns = ["Model", f"Horizon (largest T with >= {100 * SOLVED:.0f}%)", "Best val acc there",
               f"Steps to {100 * SOLVED:.0f}%", "Config", "Next T of the grid: best val acc"]
    body = []
    for model, h in horizons(rows, sc).items():
        r = h["trial"]
        beyond = (f"T={h['next']}: {pct(h['next_acc'])}" if h["next"] is not None else
                  f"none: the grid ends at T={max(h['grid'])}")
        body.append([MODEL_LABELS[model], "none" if r is None else f"T={h['horizon']}",
                     pct(r and r["best_val_acc"]), "n/a" if r is None else str(r["steps_to_99"]),
                     "n/a" if r is None else config_text(r), beyond])
    return columns, body


def table_rows(rows: list[dict], sc: SweepConfig) -> tuple[list[str], list[list[str]]]:
    """Best validation accuracy per model and T (over the grid point's draws), the draws that
    reached SOLVED, and the LSTM's lead over the RNN in percentage points where both ran."""
    best = best_per_cell(rows)
    lengths, models = all_lengths(sc), swept_models(sc)
    columns = ["Model"] + [f"T={t}" for t in lengths]
    acc = {m: [best[(m, t)]["best_val_acc"] if (m, t) in best else None for t in lengths] for m in models}
    out = [[MODEL_LABELS[m]] + [pct(v) if t in lengths_of(sc, m) else "-" for t, v in zip(lengths, acc[m])]
           for m in models]
    for m in models:
        cells = []
        for t in lengths:
            draws = [r for r in rows if r["model"] == m and r["seq_length"] == t]
            cells.append(f"{sum((r['best_val_acc'] or 0) >= SOLVED for r in draws)}/{len(draws)}" if draws else "-")
        out.append([f"{MODEL_LABELS[m]}: draws >= {100 * SOLVED:.0f}%"] + cells)
    if len(models) == 2:
        diff = lambda a, b: "-" if a is None or b is None else f"{100 * (a - b):+.2f} pp"  # noqa: E731
        out.append(["LSTM - RNN"] + [diff(a, b) for a, b in zip(acc["lstm"], acc["rnn"])])
    return columns, out


def markdown(columns: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(r) + " |" for r in body])


def status_counts(rows: list[dict]) -> dict[str, int]:
    kinds = ("solved", "culled", "completed", "failed")
    return {k: sum(r["status"].startswith(k) for r in rows) for k in kinds}


def table_markdown(rows: list[dict], sc: SweepConfig, wall_s: float | None = None) -> str:
    """The horizons, then the best accuracy per (model, T), then the fewest steps to SOLVED."""
    lengths = all_lengths(sc)
    counts = status_counts(rows)
    lines = [f"Horizons: sweep `{sc.name}`, {sc.input_encoding} input" +
             ("" if wall_s is None else f", {wall_s / 60:.1f} min wall clock including Ray's start") + ".", ""]
    lines += markdown(*horizon_rows(rows, sc))
    lines += ["", f"Best validation accuracy per model and T over the grid point's draws ({len(rows)} trials: "
              f"{counts['solved']} solved, {counts['culled']} culled, {counts['completed']} ran all steps, "
              f"{counts['failed']} failed). Each grid point: {sc.num_samples} draws of hidden_dim in "
              f"{{{sc.hidden_dims}}} and lr log-uniform in [{sc.lr_min:g}, {sc.lr_max:g}], each with its own seed"
              + (f", the LSTM's forget-gate bias in turn from {{{sc.forget_biases}}}" if "lstm" in swept_models(sc)
                 else "") +
              f"; up to {sc.steps} steps of batch {sc.batch_size}, solved at {100 * sc.solved_acc:g}% held for "
              f"{sc.solve_patience} validations (every {sc.eval_every} steps), culled by ASHA per grid point "
              f"or below {100 * sc.floor_acc:g}% from step {sc.floor_step}; fixed validation set of "
              f"{sc.val_size} palindromes per T. Chance is {100 * CHANCE:.0f}%. -: not on that model's grid.", ""]
    lines += markdown(*table_rows(rows, sc))
    lines += ["", f"Fewest steps any draw needed to reach {100 * SOLVED:.0f}% validation accuracy "
                  f"(checked every {sc.eval_every} steps; never: no draw got there):", ""]
    body = []
    for model in swept_models(sc):
        cells = []
        for t in lengths:
            if t not in lengths_of(sc, model):
                cells.append("-")
                continue
            fastest = min((r["steps_to_99"] for r in rows if r["model"] == model and r["seq_length"] == t
                           and r["steps_to_99"]), default=None)
            cells.append(str(fastest) if fastest else "never")
        body.append([MODEL_LABELS[model]] + cells)
    lines += markdown(["Model"] + [f"T={t}" for t in lengths], body)
    return "\n".join(lines) + "\n"


def fewest_steps(rows: list[dict], model: str, lengths: list[int]) -> dict[int, int]:
    out = {}
    for t in lengths:
        steps = [r["steps_to_99"] for r in rows if r["model"] == model and r["seq_length"] == t and r["steps_to_99"]]
        if steps:
            out[t] = min(steps)
    return out


def plot_horizon(rows: list[dict], sc: SweepConfig, path: Path) -> Path:
    """Left: the best validation accuracy against T per model (every draw faint, chance marked,
    each horizon dotted). Right: the fewest steps any draw needed to reach SOLVED."""
    best, found = best_per_cell(rows), horizons(rows, sc)
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(12, 4.6))
    for model, style in (("lstm", "o-"), ("rnn", "s--")):
        if model not in swept_models(sc):
            continue
        label, lengths = MODEL_LABELS[model], lengths_of(sc, model)
        trials = [r for r in rows if r["model"] == model and r["best_val_acc"] is not None]
        ts = [t for t in lengths if (model, t) in best]
        h = found[model]["horizon"]
        line = ax.plot(ts, [best[(model, t)]["best_val_acc"] for t in ts], style, lw=2,
                       label=f"{label}: best draw (horizon T={h})")
        color = line[0].get_color()
        ax.scatter([r["seq_length"] for r in trials], [r["best_val_acc"] for r in trials], s=14, alpha=0.35,
                   color=color, label=f"{label}: each draw")
        if h is not None:
            ax.axvline(h, color=color, ls=":", lw=1)
        fastest = fewest_steps(rows, model, lengths)
        ax_steps.plot(list(fastest), list(fastest.values()), style, color=color, lw=2, label=label)
    ax.axhline(CHANCE, color="grey", ls="-.", lw=1, label=f"chance ({100 * CHANCE:.0f}%)")
    ax.axhline(SOLVED, color="grey", ls=":", lw=1)
    lengths = all_lengths(sc)
    scale = "log" if max(lengths) / min(lengths) > 8 else "linear"
    for a in (ax, ax_steps):
        a.set_xscale(scale)
        a.set_xticks(lengths)
        a.set_xticklabels([str(t) for t in lengths], fontsize=8)
        a.minorticks_off()
        a.grid(alpha=0.3)
    ax.set(xlabel="palindrome length T", ylabel="best validation accuracy", ylim=(0, 1.03),
           title=f"best accuracy against T ({len(rows)} trials)")
    ax_steps.set(xlabel="palindrome length T", ylabel=f"steps to {100 * SOLVED:.0f}% validation accuracy",
                 xlim=ax.get_xlim(), ylim=(0, sc.steps * 1.03),
                 title=f"fewest steps to {100 * SOLVED:.0f}% (missing: never reached)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax_steps.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(f"sweep {sc.name} ({sc.input_encoding} input, <= {sc.steps} steps per trial)")
    return save_figure(fig, path)


def trainer_argv(cfg: LSTMConfig) -> list[str]:
    """The trainers/lstm.py flags that rebuild ``cfg`` (all but where it writes and how it shows)."""
    default, argv = LSTMConfig(), []
    for f in fields(LSTMConfig):
        value = getattr(cfg, f.name)
        if f.name in NOT_REPRODUCED or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv


def best_entry(r: dict, sc: SweepConfig) -> dict[str, Any]:
    fixed = fixed_trial_settings(sc)
    cfg = trial_config({"fixed": fixed, "model": r["model"], "seq_length": r["seq_length"], "draw": r["draw"],
                        "hidden_dim": r["hidden_dim"], "lr": r["lr"],
                        "forget_bias": r["forget_bias"] if r["forget_bias"] is not None else LSTMConfig.forget_bias},
                       r["trial_id"])
    argv = trainer_argv(cfg)
    return {"best_val_acc": r["best_val_acc"], "best_step": r["best_step"], "steps_to_99": r["steps_to_99"],
            "trial_id": r["trial_id"], "status": r["status"], "run_dir": r["run_dir"],
            "hidden_dim": r["hidden_dim"], "lr": r["lr"], "forget_bias": r["forget_bias"], "draw": r["draw"],
            "argv": argv, "command": " ".join(["python trainers/lstm.py", *argv]), "config": asdict(cfg)}


def best_json(rows: list[dict], sc: SweepConfig) -> dict:
    """Each model's horizon (the trial that reached it, with the trainer command that reruns it)
    and the best trial of every (model, T)."""
    out: dict[str, Any] = {"solved_at": SOLVED, "input_encoding": sc.input_encoding, "horizons": {}, "cells": {}}
    for model, h in horizons(rows, sc).items():
        out["horizons"][model] = None if h["trial"] is None else {"seq_length": h["horizon"],
                                                                  **best_entry(h["trial"], sc)}
    for (model, t), r in sorted(best_per_cell(rows).items()):
        out["cells"].setdefault(model, {})[str(t)] = best_entry(r, sc)
    return out


def write_outputs(rows: list[dict], sc: SweepConfig, wall_s: float | None = None) -> dict[str, Path]:
    d = sc.sweep_dir
    paths = {"results": write_text_atomic(d / "results.csv", results_csv(rows)),
             "table": write_text_atomic(d / "table.md", table_markdown(rows, sc, wall_s)),
             "figure": plot_horizon(rows, sc, d / "figures" / "horizon.png")}
    write_json_atomic(d / "best.json", best_json(rows, sc))
    paths["best"] = d / "best.json"
    log_summary_run(rows, sc, paths["figure"], wall_s)
    return paths


def log_summary_run(rows: list[dict], sc: SweepConfig, figure: Path, wall_s: float | None = None) -> None:
    """One wandb run in the sweep's group: the horizons and the accuracy per T as tables, each
    model's best accuracy and steps to SOLVED against T as native line plots, every trial's row,
    the figure, and the horizons in the run summary."""
    from trainers.runtime import make_accelerator
    from trainers.tracking import start_tracker

    accelerator = make_accelerator("no", sc.wandb, sc.sweep_dir)
    tracker = start_tracker(accelerator, sc.wandb_project, f"{sc.name}-summary", asdict(sc), sc.sweep_dir,
                            group=sc.name, job_type="sweep-summary", tags=(sc.input_encoding,))
    tracker.log_table("sweep/horizons", *horizon_rows(rows, sc), step=0)
    tracker.log_table("sweep/table", *table_rows(rows, sc), step=0)
    tracker.log_table("sweep/trials", RESULT_COLUMNS, [[r[c] for c in RESULT_COLUMNS] for r in rows], step=0)
    best = best_per_cell(rows)
    for model in swept_models(sc):
        ts = [t for t in lengths_of(sc, model) if (model, t) in best]
        if ts:
            tracker.log_lines(f"sweep/{model}/best_val_acc_vs_T", ts,
                              {f"{MODEL_LABELS[model]}: best val acc": [best[model, t]["best_val_acc"] for t in ts],
                               "chance": [CHANCE] * len(ts)}, step=0,
                              title=f"{MODEL_LABELS[model]}: best validation accuracy against T", xname="T")
        fastest = fewest_steps(rows, model, lengths_of(sc, model))
        if fastest:
            tracker.log_lines(f"sweep/{model}/steps_to_99_vs_T", list(fastest),
                              {f"{MODEL_LABELS[model]}: fewest steps to {100 * SOLVED:.0f}%": list(fastest.values())},
                              step=0, title=f"{MODEL_LABELS[model]}: steps to {100 * SOLVED:.0f}% against T",
                              xname="T")
    tracker.log_images({"sweep/horizon": figure}, step=0)
    summary = {f"horizon/{m}": h["horizon"] for m, h in horizons(rows, sc).items() if h["horizon"] is not None}
    if wall_s is not None:
        summary["wall_time_s"] = round(wall_s, 1)
    tracker.summary({**summary, **{f"trials/{k}": v for k, v in status_counts(rows).items()}})
    tracker.finish()


def main(argv=None) -> dict:
    sc = parse_config(SweepConfig, argv, description=__doc__.splitlines()[0], prog="tune/lstm_sweep.py")
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
