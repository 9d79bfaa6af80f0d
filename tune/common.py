"""What the two sweeps (tune/lstm_sweep.py, tune/gan_sweep.py) share: list flags, starting or joining
Ray, a trial's resources, --resume, and one run of a Tuner from the flags to the report.

A sweep's config has the groups ``scheduling`` (address, num_cpus, cpus_per_trial, gpus_per_trial)
and ``output`` (resume, ...), a ``sweep_dir`` and a ``validate()``. It writes <sweep_dir>/sweep.json
(its flags), <sweep_dir>/tune/ (Ray's experiment state) and, once every trial has ended, its report.
Ray is imported lazily: training needs no Ray.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Sequence

import tyro

from trainers.cli import UsageError, flatten, from_saved, override, require_writable_dir
from trainers.files import write_json_atomic

UNFINISHED = ("pending", "running", "paused")     # statuses of the trials an interrupted sweep left
# Flags of a running sweep that --resume takes from the command line, not from sweep.json.
RUNTIME_FLAGS = ("address", "num_cpus", "out_dir", "name", "resume", "quick")
# flags of a trial's config that best.json's command leaves out (where the rerun writes, and how it shows)
NOT_REPRODUCED = ("out_dir", "run_name", "wandb_group", "wandb_job_type", "progress", "resume")


# --- list flags ------------------------------------------------------------------------------------

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


def check_list(values: tuple, name: str, low: float | None = None) -> None:
    flag = "--" + name.replace("_", "-")
    if not values:
        raise UsageError(f"{flag} is empty; give one or more values, e.g. {flag} 20 30 50")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} values must be finite numbers, got {values}")
    bad = [v for v in values if low is not None and v < low]
    if bad:
        raise UsageError(f"{flag} values must be >= {low}, got {bad[0]}")


# --- the flag groups every sweep has ------------------------------------------------------------------

@dataclass
class Resources:
    """scheduling and resources"""
    cpus_per_trial: float = 1.0  # CPUs per trial (fractions allowed)
    gpus_per_trial: float = 0.0  # GPUs per trial (fractions allowed, e.g. 0.25 packs 4 per GPU)
    max_failures: int = 2  # retries of a crashed trial, each from its last reported checkpoint
    address: str = ""  # join this Ray cluster (host:port, ray://host:port or auto); empty starts a local Ray
    num_cpus: int = 0  # CPUs of the local Ray (0: all of this machine's)


@dataclass
class Output:
    """output"""
    out_dir: str = "runs"  # root folder; the sweep goes to <out-dir>/sweeps/<name>
    name: str = "sweep"  # sweep name: folder and wandb group
    resume: bool = False  # continue the interrupted sweep <name> (Tuner.restore; its saved search flags)
    quick: bool = False  # the quick preset (flags given still apply)
    wandb: bool = True  # one offline wandb run per trial plus a summary run; --no-wandb for none
    wandb_project: str = "palgan"  # wandb project


def check_output(sc) -> None:
    """The output flags of a sweep config ``sc``: a plain --name, a writable --out-dir and sweep folder."""
    name = sc.output.name
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name must be a plain folder name, got {name!r}")
    require_writable_dir(sc.output.out_dir, "out_dir")
    require_writable_dir(sc.sweep_dir, "out_dir")


# --- Ray -------------------------------------------------------------------------------------------

def connect_ray(address: str, num_cpus: int) -> bool:
    """Start a local Ray or join ``address`` (token auth, one-line errors, a watch on the head:
    tune/cluster.py); returns whether this call started it (and so must shut it down). Reuses a
    session that is already up (tests share one). Ray is imported only here: joining a cluster
    with a token must set up auth before Ray reads its settings."""
    from tune.cluster import check_reachable, join

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        if address:
            check_reachable(address)
        return False
    if address:
        join(address)
        return True
    import ray

    # address="local": a Ray of its own, even where another one runs on this machine
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=256 * 1024 ** 2)
    return True


def check_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """A trial that fits no node would wait forever: say so now."""
    import ray

    total = ray.cluster_resources()
    for key, need, flag in (("CPU", cpus_per_trial, "--cpus-per-trial"), ("GPU", gpus_per_trial, "--gpus-per-trial")):
        if need > 0 and total.get(key, 0) < need:
            raise UsageError(f"{flag} {need:g} but the Ray cluster has {total.get(key, 0):g} {key}s; "
                             f"lower {flag} or join a larger cluster with --address")


def with_resources(fn: Callable, sc):
    """The function trainable ``fn`` with the sweep's CPUs and GPUs per trial."""
    from ray import tune

    return tune.with_resources(fn, {"cpu": sc.scheduling.cpus_per_trial, "gpu": sc.scheduling.gpus_per_trial})


# --- one sweep, from its flags to its report ---------------------------------------------------------

def load_for_resume(sc):
    """--resume: the saved sweep's flags, with this command's runtime flags on top."""
    saved = sc.sweep_dir / "sweep.json"
    if not saved.exists():
        raise UsageError(f"--resume: no sweep at {sc.sweep_dir}; run without --resume to start it, "
                         "or pass the --out-dir/--name it was started with")
    try:
        stored = json.loads(saved.read_text())
        base = from_saved(type(sc), {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    except (ValueError, TypeError, AttributeError) as err:
        raise UsageError(f"--resume: {saved} is unreadable ({err.__class__.__name__}); "
                         "start the sweep again under another --name") from None
    now = flatten(sc)
    return override(base, **{k: now[k] for k in RUNTIME_FLAGS})


def sweep_runner(run_trial: Callable, build_tuner: Callable, check_trials: Callable, collect_rows: Callable,
                 write_report: Callable) -> Callable:
    """A sweep's ``run_sweep(sc, callbacks=None, verbose=1)``: run (or resume) the sweep ``sc`` and,
    once every trial has ended, write its report.

    ``check_trials(sc)`` validates trial configs before Ray starts; ``run_trial`` is the Tune function
    trainable (given the sweep's resources here) and ``build_tuner(sc, trainable, callbacks, verbose)``
    makes the Tuner; ``collect_rows(sweep_dir)`` reads one row per trial (with its ``status``) back from
    disk, and ``write_report(sweep_dir, rows, wall_s)`` writes the report. ``run_sweep`` returns
    ``{"sweep_dir", "trials", "unfinished", "errors", "rows", "config"}``; ``unfinished > 0`` after an
    interrupt."""
    def trainable(sc):
        return with_resources(run_trial, sc)

    def run_sweep(sc, callbacks=None, verbose: int = 1) -> dict:
        return run(sc, trainable, lambda sc: build_tuner(sc, trainable(sc), callbacks, verbose), check_trials,
                   collect_rows, write_report)

    return run_sweep


def run(sc, trainable: Callable, build_tuner: Callable, check_trials: Callable, collect_rows: Callable,
        write_report: Callable) -> dict:
    """What ``run_sweep`` does (sweep_runner), with ``trainable(sc)`` the trainable given ``sc``'s
    resources and ``build_tuner(sc)`` a new sweep's Tuner."""
    t0 = time.perf_counter()
    sc.validate()
    sweep_dir = sc.sweep_dir
    if sc.output.resume:
        sc = load_for_resume(sc)
        sc.validate()
    elif (sweep_dir / "sweep.json").exists() or (sweep_dir / "tune").exists():
        raise UsageError(f"{sweep_dir} already holds a sweep; pass --resume to continue it or choose another --name")
    check_trials(sc)
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"   # trials keep the driver's working directory
    started = connect_ray(sc.scheduling.address, sc.scheduling.num_cpus)
    try:
        check_resources(sc.scheduling.cpus_per_trial, sc.scheduling.gpus_per_trial)
        from ray.tune import Tuner

        if sc.output.resume:
            if not Tuner.can_restore(str(sweep_dir / "tune")):
                raise UsageError(f"--resume: {sweep_dir / 'tune'} holds no Ray Tune state to restore; "
                                 "start the sweep again under another --name")
            tuner = Tuner.restore(str(sweep_dir / "tune"), trainable(sc), resume_errored=True)
        else:
            write_json_atomic(sweep_dir / "sweep.json", flatten(sc))
            tuner = build_tuner(sc)
        tuner.fit()
    finally:
        if started:
            import ray
            ray.shutdown()
    rows = collect_rows(sweep_dir)
    unfinished = sum(r["status"] in UNFINISHED for r in rows)
    if unfinished == 0:
        write_report(sweep_dir, rows, wall_s=time.perf_counter() - t0)
    return {"sweep_dir": sweep_dir, "trials": len(rows), "unfinished": unfinished,
            "errors": sum(r["status"] == "failed" for r in rows), "rows": rows, "config": sc}


def sweep_main(module: str) -> Callable:
    """A sweep's command ``main(argv=None)``: its flags parsed, the sweep run, its table printed (or,
    after an interrupt, how to continue). ``module`` (tune.lstm_sweep, tune.gan_sweep) is imported by
    name, also when run as a script, so Ray pickles its trainable by module name."""
    def main(argv=None) -> dict:
        import importlib

        sweep, prog = importlib.import_module(module), module.rsplit(".", 1)[-1]
        sc = sweep.parse_sweep(argv, prog=f"tune/{prog}.py", description=sweep.__doc__.splitlines()[0])
        t0 = time.perf_counter()
        outcome = sweep.run_sweep(sc)
        print_outcome(prog, outcome, time.perf_counter() - t0)
        return outcome

    return main


def print_outcome(prog: str, outcome: dict, wall_s: float) -> None:
    """The end of a sweep's command: its table, or how to continue an interrupted one (exit 130)."""
    if outcome["unfinished"]:
        sys.stderr.write(f"{prog}: interrupted with {outcome['unfinished']} of {outcome['trials']} trials "
                         f"unfinished; continue with the same command plus --resume\n")
        sys.exit(130)
    print((Path(outcome["sweep_dir"]) / "table.md").read_text())
    print(f"{outcome['trials']} trials ({outcome['errors']} failed) in {wall_s:.0f}s -> {outcome['sweep_dir']}")


def parse_with_preset(cls, preset: dict, argv: Sequence[str] | None, prog: str, description: str):
    """The command line -> a validated ``cls``; with --quick the ``preset`` replaces the defaults."""
    from trainers.cli import parse

    argv = list(sys.argv[1:] if argv is None else argv)
    quick = [a for a in argv if a in ("--quick", "--no-quick")][-1:] == ["--quick"]
    default = override(cls(), quick=True, **preset) if quick else None
    return parse(cls, argv, prog=prog, description=description, default=default)


# --- what both reports read and write ---------------------------------------------------------------

def read_metrics(run_dir: Path | None) -> dict:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}


def markdown(columns: list[str], body: list[list[str]]) -> list[str]:
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return [row(columns), "|" + "---|" * len(columns), *map(row, body)]


def results_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def trainer_argv(cfg, base) -> list[str]:
    """The trainer flags that rebuild ``cfg`` from ``base`` (its config type's defaults or a preset),
    all but where it writes and how it shows."""
    default, argv = flatten(base), []
    for name, value in flatten(cfg).items():
        if name not in NOT_REPRODUCED and value != default[name]:
            flag = "--" + name.replace("_", "-")
            argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv


def sweep_flags(sweep_dir: Path) -> tuple[Path, dict]:
    """The sweep's folder, resolved, and its flags (sweep.json)."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    try:
        return sweep_dir, json.loads((sweep_dir / "sweep.json").read_text())
    except (OSError, ValueError):
        raise UsageError(f"{sweep_dir} holds no readable sweep.json; pass a sweep's folder, "
                         "<out-dir>/sweeps/<name>") from None


def check_ended(sweep_dir: Path, rows: list[dict], prog: str) -> None:
    """A report is of a whole sweep: every trial has ended."""
    unfinished = sum(r["status"] in UNFINISHED for r in rows)
    if unfinished or not rows:
        raise UsageError(f"{sweep_dir}: {unfinished} of {len(rows)} trials have not ended; finish the sweep with "
                         f"{prog} --resume (the same --out-dir and --name) first")


def ended_sweep(sweep_dir: Path, rows: list[dict] | None, collect_rows: Callable, prog: str) -> tuple[Path, dict, list]:
    """A finished sweep's folder (resolved), its flags and its rows (read back with ``collect_rows``
    unless given); a one-line error naming ``prog --resume`` while a trial has not ended."""
    sweep_dir, f = sweep_flags(sweep_dir)
    rows = collect_rows(sweep_dir) if rows is None else rows
    check_ended(sweep_dir, rows, prog)
    return sweep_dir, f, rows
