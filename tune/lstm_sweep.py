"""Ray Tune sweep of the palindrome trainer: best accuracy against T for the LSTM and the RNN.

    python tune/lstm_sweep.py --quick                         # <= 10 min on a 2-core CPU: T in {5, 10, 20}
    python tune/lstm_sweep.py                                 # full grid T = 5..30, 4 draws per (model, T)
    python tune/lstm_sweep.py --address HEAD:6379 --gpus-per-trial 0.25   # join a running Ray cluster
    python tune/lstm_sweep.py --quick --resume                # continue an interrupted sweep (Ctrl-C once)

Each trial is ``trainers.lstm.train(LSTMConfig)``, the CLI's own loop: it reports to Tune after
every validation pass with a Tune checkpoint holding a copy of the trainer's checkpoint, so ASHA,
FailureConfig retries and ``--resume`` continue a trial where it stopped (via ``cfg.resume``).
Writes <out-dir>/sweeps/<name>/{results.csv, table.md, figures/acc_vs_T.png, best.json, sweep.json}
plus tune/ (Ray's experiment state) and trials/<run>/ (each trainer run folder, with its wandb run).
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
MODEL_LABELS = {"lstm": "LSTM", "rnn": "Vanilla RNN"}
METRIC = "val/acc"              # what ASHA compares and the table reports
TIME_ATTR = "step"              # ASHA's clock: the trainer step of each report
POINTER = "tune_pointer.json"   # written next to the trainer checkpoint inside a Tune checkpoint
ATTEMPTS = "attempts.jsonl"     # one line per start of a trial's trainer (first start or resume)
CHANCE = 1.0 / NUM_CLASSES


@dataclass
class SweepConfig:
    # search space
    models: str = arg("lstm,rnn", "comma-separated models to sweep (lstm, rnn)", "search")
    seq_lengths: str = arg("5,10,15,20,25,30", "comma-separated palindrome lengths T (the grid)", "search")
    hidden_dims: str = arg("32,64,128,256", "hidden sizes drawn from (uniformly)", "search")
    lr_min: float = arg(1e-4, "lower end of the log-uniform learning-rate range", "search")
    lr_max: float = arg(1e-2, "upper end of the log-uniform learning-rate range", "search")
    num_samples: int = arg(4, "draws of (hidden_dim, lr) per grid point (model, T)", "search")
    # every trial (the rest of LSTMConfig keeps the trainer's defaults)
    steps: int = arg(10_000, "training steps per trial (the report's 10k)", "trial")
    eval_every: int = arg(500, "steps between validation passes = Tune reports = checkpoints", "trial")
    batch_size: int = arg(128, "sequences per step", "trial")
    val_size: int = arg(10_000, "validation sequences per T", "trial")
    input_encoding: str = arg("onehot", "digit encoding of every trial (scalar: the course template's 1-d input)",
                              "trial", ("onehot", "scalar"))
    seed: int = arg(0, "trainer seed of every trial, and seed of the (hidden_dim, lr) draws", "trial")
    # scheduling and resources
    grace_period: int = arg(2000, "ASHA: steps before a trial can be stopped", "scheduling")
    reduction_factor: float = arg(3.0, "ASHA: keep the top 1/rf of a grid point's trials at each rung", "scheduling")
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
    quick: bool = arg(False, "the quick preset: T in 5,10,20, hidden 32,64, 2 draws, 1000 steps", "output")
    wandb: bool = arg(True, "one offline wandb run per trial plus a summary run; --no-wandb for none",
                      "output")
    wandb_project: str = arg("palgan", "wandb project", "output")

    def validate(self) -> None:
        parse_models(self.models)
        parse_ints(self.seq_lengths, "seq_lengths", low=2)
        parse_ints(self.hidden_dims, "hidden_dims", low=1)
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
# the default: 6 grid points x 2 draws = 12 trials of 1000 steps each.
QUICK = dict(seq_lengths="5,10,20", hidden_dims="32,64", num_samples=2, steps=1000, eval_every=100,
             grace_period=300, val_size=2000, name="quick")
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
    """The trainer config of one trial: the sampled point plus the sweep's fixed settings."""
    fixed = config["fixed"]
    cfg = LSTMConfig(**fixed, model=config["model"], seq_length=config["seq_length"],
                     hidden_dim=config["hidden_dim"], lr=config["lr"],
                     run_name=run_name(config["model"], config["seq_length"], config["hidden_dim"], trial_id))
    cfg.checkpoint_every = cfg.eval_every   # a checkpoint behind every report
    return cfg


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX):])


def restore_trainer_checkpoint(cfg: LSTMConfig, tune_ckpt_dir: Path | None) -> int:
    """Pick where a (re)started trial continues; sets ``cfg.resume`` and returns the step.

    The trainer's own latest checkpoint wins when it is at least as recent as the one Tune hands
    back: Tune registers a reported checkpoint asynchronously, so after a Ctrl-C or a crash it may
    restore the previous one although the report after it was received (continuing from Tune's
    would train and report those steps twice). Tune's copy is used when the run folder lacks it
    (a trial moved to another node, or a deleted folder)."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    local = list_checkpoints(ckpt_dir)
    restored = None
    if tune_ckpt_dir is not None:
        restored = tune_ckpt_dir / json.loads((tune_ckpt_dir / POINTER).read_text())["checkpoint"]
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

    cfg = trial_config(config, get_context().get_trial_id())
    checkpoint = get_checkpoint()
    if checkpoint is None:
        start = restore_trainer_checkpoint(cfg, None)
    else:
        with checkpoint.as_directory() as d:
            start = restore_trainer_checkpoint(cfg, Path(d))
    log_attempt(cfg, start)
    train(cfg, on_eval=report_to_tune)


def trial_dirname(trial) -> str:
    return f"{trial.config['model']}-T{trial.config['seq_length']}-{trial.trial_id}"


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
        ray.init(num_cpus=sc.num_cpus or os.cpu_count(), include_dashboard=False,
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
                wandb_project=sc.wandb_project, wandb_group=sc.name, progress=False)


def check_trial_configs(sc: SweepConfig) -> None:
    """Validate a trial config at each corner of the space before any worker starts."""
    fixed = fixed_trial_settings(sc)
    for model in parse_models(sc.models):
        for hidden in parse_ints(sc.hidden_dims, "hidden_dims", 1):
            for lr in (sc.lr_min, sc.lr_max):
                trial_config({"fixed": fixed, "model": model, "seq_length": 2, "hidden_dim": hidden,
                              "lr": lr}, "check").validate()


def build_tuner(sc: SweepConfig, callbacks=None, verbose: int = 1):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tune.asha import GroupedASHA

    param_space = {
        "model": tune.grid_search(parse_models(sc.models)),
        "seq_length": tune.grid_search(parse_ints(sc.seq_lengths, "seq_lengths", 2)),
        "hidden_dim": tune.choice(parse_ints(sc.hidden_dims, "hidden_dims", 1)),
        "lr": tune.loguniform(sc.lr_min, sc.lr_max),
        "fixed": fixed_trial_settings(sc),
    }
    scheduler = GroupedASHA(("model", "seq_length"), metric=METRIC, mode="max", time_attr=TIME_ATTR,
                            max_t=sc.steps, grace_period=sc.grace_period,
                            reduction_factor=sc.reduction_factor)
    return tune.Tuner(
        trainable(sc),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=sc.num_samples, scheduler=scheduler,
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
        write_outputs(rows, sc)
    return {"sweep_dir": sweep_dir, "trials": len(rows), "unfinished": unfinished,
            "errors": sum(r["status"] == "error" for r in rows), "rows": rows}


# --- outputs -------------------------------------------------------------------------------------

SOLVED = 0.99   # validation accuracy that counts as solved, for steps_to_solve
RESULT_COLUMNS = ("trial_id", "model", "seq_length", "hidden_dim", "lr", "status", "steps", "best_val_acc",
                  "best_step", "steps_to_solve", "val_acc", "val_loss", "train_acc", "train_loss", "time_s", "run_dir")


def collect_rows(experiment_dir: Path, sc: SweepConfig) -> list[dict]:
    """One row per trial, read back from Tune's experiment state on disk: its config, last and
    best reported metrics, and how it ended."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    rows = []
    for trial in analysis.trials:
        config, last = trial.config, trial.last_result or {}
        history = analysis.trial_dataframes.get(trial.trial_id)
        row = {"trial_id": trial.trial_id, "model": config["model"], "seq_length": config["seq_length"],
               "hidden_dim": config["hidden_dim"], "lr": config["lr"],
               "run_dir": str(trial_config(config, trial.trial_id).run_dir)}
        if history is not None and METRIC in history and len(history):
            accs, steps = history[METRIC].astype(float).values, history[TIME_ATTR].astype(int).values
            best = int(accs.argmax())
            solved = [int(s) for a, s in zip(accs, steps) if a >= SOLVED]
            row.update(best_val_acc=float(accs[best]), best_step=int(steps[best]),
                       steps_to_solve=min(solved) if solved else None)
        row.update(steps=last.get(TIME_ATTR), val_acc=last.get("val/acc"), val_loss=last.get("val/loss"),
                   train_acc=last.get("train/acc"), train_loss=last.get("train/loss"),
                   time_s=round(float(last.get("time_total_s", 0.0)), 1))
        row["status"] = ("error" if trial.status == "ERROR" else
                         trial.status.lower() if trial.status != "TERMINATED" else
                         "completed" if last.get(TIME_ATTR) == sc.steps else "stopped by ASHA")
        rows.append({k: row.get(k) for k in RESULT_COLUMNS})
    rows.sort(key=lambda r: (r["model"], r["seq_length"], r["trial_id"]))
    return rows


def best_per_cell(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(model, T) -> the row with the highest best_val_acc."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r["best_val_acc"] is None:
            continue
        key = (r["model"], r["seq_length"])
        if key not in best or r["best_val_acc"] > best[key]["best_val_acc"]:
            best[key] = r
    return best


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


def table_rows(rows: list[dict], sc: SweepConfig) -> tuple[list[str], list[list[str]]]:
    """Table 1 of the report, honest: best validation accuracy per model and T, their mean
    over T, and the LSTM's improvement over the RNN in percentage points."""
    best = best_per_cell(rows)
    lengths = parse_ints(sc.seq_lengths, "seq_lengths", 2)
    models = [m for m in ("rnn", "lstm") if m in parse_models(sc.models)]
    columns = ["Model"] + [f"T={t}" for t in lengths] + ["Avg."]
    acc = {m: [best[(m, t)]["best_val_acc"] if (m, t) in best else None for t in lengths] for m in models}

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    out = [[MODEL_LABELS[m]] + [pct(v) for v in acc[m]] + [pct(mean(acc[m]))] for m in models]
    if len(models) == 2:
        diff = lambda a, b: "n/a" if a is None or b is None else f"{100 * (a - b):+.2f} pp"  # noqa: E731
        out.append(["Improvement (LSTM - RNN)"] + [diff(a, b) for a, b in zip(acc["lstm"], acc["rnn"])]
                   + [diff(mean(acc["lstm"]), mean(acc["rnn"]))])
    return columns, out


def table_markdown(rows: list[dict], sc: SweepConfig) -> str:
    """Table 1 (best accuracy) with a note on what produced it, then the fewest steps to SOLVED."""
    columns, body = table_rows(rows, sc)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped by ASHA", "error")}
    lines += ["", f"Best validation accuracy over each (model, T)'s trials; sweep `{sc.name}`: {len(rows)} trials "
              f"({counts['completed']} completed, {counts['stopped by ASHA']} stopped by ASHA, {counts['error']} "
              f"errors), {sc.num_samples} draw(s) per cell of hidden_dim in {{{sc.hidden_dims}}} and lr "
              f"log-uniform in [{sc.lr_min:g}, {sc.lr_max:g}], up to {sc.steps} steps of batch {sc.batch_size}, "
              f"validation set of {sc.val_size} palindromes per T, {sc.input_encoding} input. "
              f"Chance is {100 * CHANCE:.0f}%."]
    lengths = parse_ints(sc.seq_lengths, "seq_lengths", 2)
    lines += ["", f"Fewest steps any trial needed to reach {100 * SOLVED:.0f}% validation accuracy "
                  f"(checked every {sc.eval_every} steps; never: no trial got there):", "",
              "| Model | " + " | ".join(f"T={t}" for t in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    for model in [m for m in ("rnn", "lstm") if m in parse_models(sc.models)]:
        fastest = [min((r["steps_to_solve"] for r in rows if r["model"] == model and r["seq_length"] == t
                        and r["steps_to_solve"]), default=None) for t in lengths]
        lines.append(f"| {MODEL_LABELS[model]} | " + " | ".join(str(f) if f else "never" for f in fastest) + " |")
    return "\n".join(lines) + "\n"


def plot_acc_vs_T(rows: list[dict], sc: SweepConfig, path: Path) -> Path:
    """Left: the best validation accuracy against T per model (and every trial's best, faint).
    Right: the fewest steps any trial needed to reach SOLVED accuracy, for when both reach 100%."""
    best = best_per_cell(rows)
    lengths = parse_ints(sc.seq_lengths, "seq_lengths", 2)
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, style in (("lstm", "o-"), ("rnn", "s--")):
        if model not in parse_models(sc.models):
            continue
        label = MODEL_LABELS[model]
        trials = [r for r in rows if r["model"] == model and r["best_val_acc"] is not None]
        ts = [t for t in lengths if (model, t) in best]
        line = ax.plot(ts, [best[(model, t)]["best_val_acc"] for t in ts], style, lw=2, label=f"{label}: best trial")
        color = line[0].get_color()
        ax.scatter([r["seq_length"] for r in trials], [r["best_val_acc"] for r in trials], s=14, alpha=0.35,
                   color=color, label=f"{label}: each trial")
        fastest = {t: min((r["steps_to_solve"] for r in trials if r["seq_length"] == t and r["steps_to_solve"]),
                          default=None) for t in lengths}
        solved = [t for t in lengths if fastest[t]]
        ax_steps.plot(solved, [fastest[t] for t in solved], style, color=color, lw=2, label=label)
    ax.axhline(CHANCE, color="grey", ls=":", label="chance (10%)")
    ax.set(xlabel="palindrome length T", ylabel="best validation accuracy", ylim=(0, 1.03), xticks=lengths,
           title=f"best accuracy against T ({len(rows)} trials, <= {sc.steps} steps)")
    ax_steps.set(xlabel="palindrome length T", ylabel=f"steps to {100 * SOLVED:.0f}% validation accuracy",
                 xticks=lengths, xlim=ax.get_xlim(), ylim=(0, sc.steps * 1.03),
                 title=f"fewest steps to {100 * SOLVED:.0f}% (missing: never reached)")
    for a in (ax, ax_steps):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax_steps.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(f"sweep {sc.name} ({sc.input_encoding} input)")
    return save_figure(fig, path)


def best_json(rows: list[dict], sc: SweepConfig) -> dict:
    """model -> T -> the best trial: its accuracy, step, and full trainer config."""
    out: dict[str, dict[str, Any]] = {}
    fixed = fixed_trial_settings(sc)
    for (model, t), r in sorted(best_per_cell(rows).items()):
        cfg = trial_config({"fixed": fixed, "model": model, "seq_length": t, "hidden_dim": r["hidden_dim"],
                            "lr": r["lr"]}, r["trial_id"])
        out.setdefault(model, {})[str(t)] = {
            "best_val_acc": r["best_val_acc"], "best_step": r["best_step"], "trial_id": r["trial_id"],
            "hidden_dim": r["hidden_dim"], "lr": r["lr"], "status": r["status"], "run_dir": r["run_dir"],
            "config": asdict(cfg)}
    return out


def write_outputs(rows: list[dict], sc: SweepConfig) -> dict[str, Path]:
    d = sc.sweep_dir
    paths = {"results": write_text_atomic(d / "results.csv", results_csv(rows)),
             "table": write_text_atomic(d / "table.md", table_markdown(rows, sc)),
             "figure": plot_acc_vs_T(rows, sc, d / "figures" / "acc_vs_T.png")}
    write_json_atomic(d / "best.json", best_json(rows, sc))
    paths["best"] = d / "best.json"
    log_summary_run(rows, sc, paths["figure"])
    return paths


def log_summary_run(rows: list[dict], sc: SweepConfig, figure: Path) -> None:
    """One wandb run in the sweep's group holding the table, every trial's row and the figure."""
    from trainers.runtime import make_accelerator
    from trainers.tracking import start_tracker

    accelerator = make_accelerator("no", sc.wandb, sc.sweep_dir)
    tracker = start_tracker(accelerator, sc.wandb_project, f"{sc.name}-summary", asdict(sc), sc.sweep_dir,
                            group=sc.name)
    columns, body = table_rows(rows, sc)
    tracker.log_table("sweep/table", columns, body, step=0)
    tracker.log_table("sweep/trials", RESULT_COLUMNS, [[r[c] for c in RESULT_COLUMNS] for r in rows], step=0)
    tracker.log_images({"sweep/acc_vs_T": figure}, step=0)
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
    print(f"{outcome['trials']} trials ({outcome['errors']} errors) in {wall:.0f}s -> {outcome['sweep_dir']}")
    return outcome


if __name__ == "__main__":
    # Import ourselves as tune.lstm_sweep so Ray pickles run_trial and GroupedASHA by module name.
    from tune.lstm_sweep import main as sweep_main
    run_cli(sweep_main)
