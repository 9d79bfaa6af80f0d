"""Configs and their command line: dataclasses -> flags through tyro, presets as config files.

A trainer's config is a dataclass of groups (data, model, optim, eval, log, run), each a small
dataclass whose fields carry their help text as the comment on the same line. tyro turns it into
one flag per field with the group prefix left out (``--seq-length``, not ``--data.seq-length``),
and ``--help`` shows one box per group. Flag names are unique across groups, so a config also has
a flat view, ``{flag name: value}``: config files (``--config FILE``) and saved runs use it.

Bad input raises ``UsageError``; ``run_cli`` turns it into one line on stderr and exit code 2,
with no traceback.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import typing
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

from data import DataError


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


INPUT_ERRORS = (UsageError, DataError)   # both are the user's to fix: one line, exit code 2


class JobFailure(Exception):
    """The job could not go on (a rank died, a collective timed out): one line, exit code 1."""


# --- the flat view: {flag name: value} across a config's groups -------------------------------

def _groups(cfg_or_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cfg_or_cls) if dataclasses.is_dataclass(_type_of(cfg_or_cls, f))]


def _type_of(cfg_or_cls, f: dataclasses.Field):
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    return typing.get_type_hints(cls)[f.name]


def flatten(cfg) -> dict[str, Any]:
    """``{field name: value}`` of every leaf field (the groups' fields and the top-level ones)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(flatten(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


def _where(cls) -> dict[str, tuple[str, ...]]:
    """Flat field name -> its path of attribute names, e.g. ``lr -> ("optim", "lr")``."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({k: (f.name, *v) for k, v in _where(hints[f.name]).items()})
        else:
            out[f.name] = (f.name,)
    return out


def _field_type(cls, name: str):
    """The annotation of the (flat) field ``name`` of ``cls``, None if it has none."""
    where = _where(cls).get(name)
    if where is None:
        return None
    for attr in where[:-1]:
        cls = typing.get_type_hints(cls)[attr]
    return typing.get_type_hints(cls)[where[-1]]


def override(cfg, **flat):
    """A copy of ``cfg`` with the fields named by their flag names replaced; TypeError for a name
    the config does not have (as a dataclass constructor would raise)."""
    where = _where(type(cfg))
    unknown = sorted(set(flat) - set(where))
    if unknown:
        raise TypeError(f"{type(cfg).__name__} has no fields {unknown}")
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        path = where[name]
        if len(path) == 1:
            nested[name] = value
        else:
            nested.setdefault(path[0], {})[name] = value
    changes = {k: (override(getattr(cfg, k), **v) if isinstance(v, dict) and dataclasses.is_dataclass(getattr(cfg, k))
                   else v) for k, v in nested.items()}
    return dataclasses.replace(cfg, **changes)


def build(cls, **flat):
    """``cls()`` with flat overrides: ``build(LSTMConfig, seq_length=20, seed=3)``."""
    return override(cls(), **flat)


def from_saved(cls, config: dict):
    """``cls`` from a saved flat config (a checkpoint's or metrics.json's), ignoring names it lacks."""
    known = _where(cls)
    return build(cls, **{k: v for k, v in config.items() if k in known})


def check_choices(cfg) -> None:
    """Every ``Literal[...]`` field holds one of its values (also for configs built in code, e.g. by Ray)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value)
        elif typing.get_origin(hints[f.name]) is Literal:
            require_choice(value, typing.get_args(hints[f.name]), f.name)


# --- config files ---------------------------------------------------------------------------

def read_config_file(path: str | Path, cls) -> dict[str, Any]:
    """The flat ``{flag name: value}`` of a YAML or JSON config file, checked against ``cls``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({err.strerror or err}); pass a YAML or JSON file") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml
            values = yaml.safe_load(text) or {}
    except Exception as err:   # noqa: BLE001 - yaml and json raise their own error types
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UsageError(f"--config {path} is not valid YAML/JSON ({first}); fix the file") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of flag names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(_where(cls)))
    if unknown:
        raise UsageError(f"--config {path}: unknown setting {unknown[0]!r}; use the names of the flags in --help")
    return values


# --- parsing --------------------------------------------------------------------------------

def _one_line(tyro_stderr: str) -> str:
    """The message inside tyro's error panel, as one line."""
    lines = []
    for raw in tyro_stderr.splitlines():
        line = raw.strip().strip("│").strip()
        if raw.strip().startswith(("╭", "╰")):
            continue
        if line and set(line) <= {"─"}:   # the panel's separator: the message ends there
            break
        if line:
            lines.append(line)
    return " ".join(lines) or "bad command line"


def parse(cls, argv: Sequence[str] | None, prog: str, description: str, default=None):
    """``argv`` -> a validated ``cls``: the defaults (or ``default``), then ``--config FILE`` when
    the config has a ``config`` field, then the flags given."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    if _field_type(cls, "resume") not in (None, bool):   # --resume [auto]: a bare --resume is True
        argv = bare_flag_means(argv, "--resume", "True")
    default = default if default is not None else cls()
    config_file = flag_value("--config", argv) if "config" in _where(cls) else None
    if config_file:
        default = override(default, **read_config_file(config_file, cls), config=config_file)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            cfg = tyro.cli(cls, args=argv, prog=prog, description=description, default=default,
                           config=(tyro.conf.OmitArgPrefixes,))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        raise UsageError(f"{_one_line(err.getvalue())} (see --help)") from None
    cfg.validate()
    return cfg


def bare_flag_means(argv: Sequence[str], flag: str, value: str) -> list[str]:
    """``flag`` given without a value (last, or before another flag) reads as ``flag value``:
    ``--resume`` is ``--resume True``, while ``--resume auto`` stays as it is."""
    out = []
    for k, a in enumerate(argv):
        out.append(a)
        if a == flag and (k + 1 == len(argv) or argv[k + 1].startswith("-")):
            out.append(value)
    return out


def flag_value(flag: str, argv: Sequence[str]) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag v`` or ``--flag=v``), the last one given."""
    found = None
    for k, a in enumerate(argv):
        if a == flag and k + 1 < len(argv):
            found = argv[k + 1]
        elif a.startswith(flag + "="):
            found = a.split("=", 1)[1]
    return found


# --- validation helpers: each raises UsageError naming the flag -------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{_flag(name)} must be a positive finite number, got {value!r}")


def require_non_negative(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{_flag(name)} must be a finite number >= 0, got {value!r}")


def require_choice(value: Any, choices: Sequence[Any], name: str) -> None:
    if value not in choices:
        raise UsageError(f"{_flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


def require_at_least(value: int, low: int, name: str) -> None:
    if not isinstance(value, int) or value < low:
        raise UsageError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")


def _nearest_folder(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder this process can write in."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path} lies under {parent}, which is a file; pass a path in a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: cannot write in {parent}; pass a folder you can write to")
            return


def require_writable_dir(path, name: str) -> None:
    """``path`` is a folder that exists or can be made: no part of it is a file, and the nearest
    existing folder is writable. Checked before any work, so a bad path costs nothing."""
    path, flag = Path(path).expanduser().absolute(), name if name.startswith("-") else _flag(name)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; pass a folder path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: cannot write in it; pass a folder you can write to")
        return
    _nearest_folder(path, flag)


def require_writable_file(path, name: str) -> None:
    """``path`` can be written as a file: it is not a folder, and its folder exists or can be made."""
    path, flag = Path(path).expanduser().absolute(), name if name.startswith("-") else _flag(name)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; pass a file name")
    _nearest_folder(path, flag)


# --- the groups every trainer shares ---------------------------------------------------------

DIST_TIMEOUT_S = 300   # long enough for rank 0's work alone (figures, wandb, checkpoints); a dead rank costs minutes


@dataclasses.dataclass
class Log:
    """logging"""
    wandb: bool = True  # log to wandb (offline without an API key); --no-wandb for none
    wandb_project: str = "palgan"  # wandb project
    wandb_group: str = ""  # wandb group (the sweep sets it to the sweep's name)
    wandb_job_type: str = "train"  # wandb job type, to group runs (the sweep sets sweep-trial)


@dataclasses.dataclass
class Run:
    """run"""
    out_dir: str = "runs"  # root folder of runs
    run_name: str = ""  # run folder name (default: made from the main settings, e.g. lstm-T5-h128-s0)
    seed: int = 0  # seed of the initial weights and of every random stream (data, noise)
    resume: Union[bool, Literal["auto"]] = False  # --resume: continue from the run's latest checkpoint; --resume auto: continue when one exists, else start fresh (for --max_restarts)
    checkpoint_every: int = 1000  # steps between checkpoints (the GAN also saves at each epoch end)
    keep_checkpoints: int = 3  # checkpoints kept (the oldest are deleted)
    progress: bool = True  # show a tqdm bar on the main process
    dist_timeout: int = DIST_TIMEOUT_S  # seconds a process waits in one collective before the job ends with an error

    def validate(self) -> None:
        for name in ("checkpoint_every", "keep_checkpoints", "dist_timeout"):
            require_at_least(getattr(self, name), 1, name)
        if self.resume not in (True, False, "auto"):
            raise UsageError(f"--resume takes no value, or auto; got {self.resume!r}")

    def folder(self, default_name: str) -> Path:
        """``<out-dir>/<run-name>``, absolute; ``default_name`` when --run-name is empty."""
        return Path(self.out_dir).resolve() / (self.run_name or default_name)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)``; a UsageError becomes one line on stderr and exit code 2, a JobFailure
    one line and exit code 1.

    Under a launcher (``accelerate launch``, torchrun: ``RANK`` is set) only the process of global
    rank 0 prints the line: every rank meets the same bad flag or failed collective, and one line per
    rank says nothing more. The other ranks exit with the same code, silently, after a short wait,
    so that the launcher, which stops the whole group at the first process that exits, has not yet
    stopped rank 0 before it printed."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "palgan"
    try:
        main(argv)
    except INPUT_ERRORS as err:
        _fail(prog, err, 2)
    except JobFailure as err:
        _fail(prog, err, 1)


QUIET_RANK_WAIT_S = 5   # how long a rank other than 0 waits before exiting on an error rank 0 reports


def _fail(prog: str, err: Exception, code: int) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.stderr.flush()
    else:
        import signal
        import time
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the launcher stopping the group ends the wait
        time.sleep(QUIET_RANK_WAIT_S)
    sys.exit(code)
