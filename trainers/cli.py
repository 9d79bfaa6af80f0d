"""One config dataclass per trainer -> one argparse CLI, shared by the CLI and Ray Tune.

Each field of a config dataclass becomes a kebab-case flag whose help text comes from
``field(metadata={"help": ..., "group": ...})``. Bad input raises ``UsageError``; the
entry points turn it into one line on stderr and exit code 2, with no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from data import DataError


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


INPUT_ERRORS = (UsageError, DataError)   # both are the user's to fix: one line, exit code 2


class JobFailure(Exception):
    """The job could not go on (a rank died, a collective timed out): one line, exit code 1."""


def arg(default: Any, help: str, group: str = "misc", choices: Sequence[Any] | None = None,
        aliases: Sequence[str] = ()):
    """A dataclass field that knows its CLI help text, group, choices and other flag spellings."""
    meta = {"help": help, "group": group, "choices": choices, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print a single actionable line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_order(config_cls: type) -> list[dataclasses.Field]:
    """The config's own fields, then those it inherits: the shared logging and run flags of a base
    config close ``--help``, after the trainer's data, model, optimisation and evaluation flags."""
    own = set(vars(config_cls).get("__annotations__", {}))
    fields = dataclasses.fields(config_cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per dataclass field, grouped by purpose as in nanochat."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flag_order(config_cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default) if default is not None else str
        if kind is bool:
            # --flag / --no-flag, so a default of True can still be switched off.
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=meta["help"])
            continue
        group.add_argument(_flag(f.name), *meta.get("aliases", ()), dest=f.name, type=kind, default=default,
                           choices=meta["choices"], metavar=f.name.upper() if not meta["choices"] else None,
                           help=meta["help"])


def make_parser(config_cls: type, description: str, prog: str | None = None) -> OneLineParser:
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(parser, config_cls)
    return parser


def config_from_args(config_cls: type, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(ns).items() if k in names})


def parse_config(config_cls: type, argv: Sequence[str] | None, description: str, prog: str | None = None):
    """Parse argv into a validated config (``config.validate()`` raises UsageError)."""
    ns = make_parser(config_cls, description, prog).parse_args(argv)
    cfg = config_from_args(config_cls, ns)
    cfg.validate()
    return cfg


# --- validation helpers: each raises UsageError naming the flag -------------------------

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


def validate_field_choices(cfg) -> None:
    """Check every field declared with ``choices`` (also for configs built in code, e.g. by Ray)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices:
            require_choice(getattr(cfg, f.name), choices, f.name)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)``; a UsageError becomes one line on stderr and exit code 2, a JobFailure
    one line and exit code 1."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "palgan"
    try:
        main(argv)
    except INPUT_ERRORS as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(2)
    except JobFailure as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        sys.exit(1)
