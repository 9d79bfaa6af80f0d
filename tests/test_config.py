"""The trainers' configs: one base dataclass for the shared logging and run fields, and ``--help``
grouped by purpose with each trainer's own groups first."""
from __future__ import annotations

import dataclasses
import re

import pytest

from trainers.cli import make_parser
from trainers.gan import GANConfig, make_config
from trainers.lstm import LSTMConfig
from trainers.runtime import RunConfig


def help_groups(config_cls) -> list[str]:
    text = make_parser(config_cls, "x", prog="x").format_help()
    return [g for g in re.findall(r"^(\w[\w ]*):$", text, flags=re.MULTILINE) if g != "options"]


def test_shared_fields_are_declared_once_in_the_base_config():
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    assert {"wandb", "wandb_project", "wandb_group", "wandb_job_type", "out_dir", "run_name", "seed", "resume",
            "checkpoint_every", "keep_checkpoints", "progress", "dist_timeout"} == shared
    for cls in (GANConfig, LSTMConfig):
        assert issubclass(cls, RunConfig)
        own = set(vars(cls).get("__annotations__", {}))
        assert not own & shared, (cls.__name__, own & shared)
        assert shared < {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls, groups", [
    (GANConfig, ["preset", "data", "model", "optimisation", "evaluation", "logging", "run"]),
    (LSTMConfig, ["data", "model", "optimisation", "evaluation", "logging", "run"])])
def test_help_lists_each_trainers_own_groups_first(cls, groups):
    assert help_groups(cls) == groups


def test_default_run_names():
    assert make_config("cpu-demo").name == "gan-cpu-demo-b16-s0"
    assert LSTMConfig(seq_length=20, seed=3).name == "lstm-T20-h128-s3"
    assert LSTMConfig(run_name="mine").run_dir.name == "mine"
