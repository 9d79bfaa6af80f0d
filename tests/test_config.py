"""The trainers' configs: groups shared by both trainers, ``--help`` grouped by purpose with each
trainer's own groups first, presets and --config files read as flags."""
from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import assert_usage_error, run_script
from trainers.cli import Log, Run, UsageError, build, flatten, parse
from trainers.gan import GANConfig, make_config, parse_train_args
from trainers.lstm import LSTMConfig


def help_text(script: str) -> str:
    proc = run_script([script, "--help"])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_shared_groups_are_declared_once():
    shared = {"log": Log, "run": Run}
    for cls in (GANConfig, LSTMConfig):
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, group in shared.items():
            assert hints[name] in (group, group.__name__), (cls, name)
        names = [k for k in flatten(cls())]
        assert len(names) == len(set(names)), cls    # flag names are unique across groups


@pytest.mark.parametrize("script, groups", [
    ("trainers/gan.py", ["data", "model", "optimisation", "evaluation", "logging", "run"]),
    ("trainers/lstm.py", ["data", "model", "optimisation", "evaluation", "logging", "run"])])
def test_help_lists_each_trainers_own_groups_first(script, groups):
    text = help_text(script)
    found = re.findall(r"^╭─ (\w+) options ", text, flags=re.MULTILINE)
    assert found == ["data", "model", "optim", "eval", "log", "run"], text
    for group in groups:   # each group box carries its purpose as its description
        assert re.search(rf"│ {group}\s+│", text), (group, text)
    for flag in ("--seq-length" if "lstm" in script else "--base-channels", "--lr", "--out-dir", "--no-wandb",
                 "--config"):
        assert flag in text, flag


def test_default_run_names():
    assert make_config("cpu-demo").name == "gan-cpu-demo-b16-s0"
    assert build(LSTMConfig, seq_length=20, seed=3).name == "lstm-T20-h128-s3"
    assert build(LSTMConfig, run_name="mine").run_dir.name == "mine"


def test_presets_are_config_files_and_flags_win(tmp_path):
    demo = make_config("cpu-demo")
    assert (demo.model.base_channels, demo.optim.epochs, demo.optim.mixed_precision) == (16, 8, "bf16")
    assert make_config("paper") == build(GANConfig, preset="paper")     # the paper preset is the defaults
    cfg = parse_train_args(["--preset", "cpu-demo", "--base-channels", "8"])
    assert cfg.model.base_channels == 8 and cfg.optim.epochs == 8
    mine = tmp_path / "mine.yaml"
    mine.write_text("epochs: 2\nlr: 0.001\n")
    cfg = parse_train_args(["--preset", "cpu-demo", "--config", str(mine), "--lr", "3e-4"])
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.model.base_channels) == (2, 3e-4, 16)
    lstm = tmp_path / "lstm.json"
    lstm.write_text('{"seq-length": 9, "hidden_dim": 32}')
    cfg = parse(LSTMConfig, ["--config", str(lstm)], "x", "x")
    assert (cfg.data.seq_length, cfg.model.hidden_dim) == (9, 32)


def test_bad_config_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    assert_usage_error(run_script(["trainers/lstm.py", "--config", bad]), "no_such_flag")   # as users see it
    for text, needle in (("lr: [1, 2\n", "is not valid YAML"), ("- 1\n", "mapping")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=needle):
            parse(LSTMConfig, ["--config", str(bad)], "x", "x")
    with pytest.raises(UsageError, match="missing.yaml: cannot read it"):
        parse(LSTMConfig, ["--config", str(tmp_path / "missing.yaml")], "x", "x")
    with pytest.raises(UsageError, match="--preset"):
        parse_train_args(["--preset", "nope"])
