"""The length curriculum of the LSTM trainer: its schedule, the length derived from the logged history,
bad flags, a run that follows the rule (read back from its files), and a resume in the middle of the
curriculum that ends bit for bit where an uninterrupted run does."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_usage_error, clean_env, free_port, rank_facts, run_script
from trainers import debug
from trainers.checkpoint import read_meta
from trainers.cli import build
from trainers.lstm import (LSTMConfig, build_model, curriculum_length, curriculum_lengths, train, train_batch,
                           validation_set)
from wandb_files import read_offline_run


def config(**kw) -> LSTMConfig:
    return build(LSTMConfig, curriculum=True, **kw)


def test_the_schedule_starts_at_an_eighth_and_grows_to_t():
    assert curriculum_lengths(config(seq_length=1000)) == [125, 250, 500, 1000]
    assert curriculum_lengths(config(seq_length=10)) == [2, 4, 8, 10]          # T/8 = 1 is raised to 2
    assert curriculum_lengths(config(seq_length=100, curriculum_start=5, curriculum_growth=3)) == [5, 15, 45, 100]
    assert curriculum_lengths(config(seq_length=100, curriculum_start=7, curriculum_growth=1.5)) == \
        [7, 11, 17, 26, 39, 59, 89, 100]                                           # ceil at each step
    assert curriculum_lengths(config(seq_length=30, curriculum_start=30)) == [30]
    assert curriculum_lengths(build(LSTMConfig, seq_length=40)) == [40]           # no curriculum: T alone


def test_the_length_comes_from_the_logged_history():
    cfg = config(seq_length=80)
    assert curriculum_length(cfg, []) == 10
    history = [{"step": 0, "curriculum/T": 10}, {"step": 50, "train/acc": 1.0, "train/loss": 0.0},
               {"step": 50, "curriculum/T": 20}, {"step": 100, "val/acc": 0.1, "val/loss": 2.3}]
    assert curriculum_length(cfg, history) == 20
    assert curriculum_length(build(LSTMConfig, seq_length=80), []) == 80


def test_a_batch_has_the_asked_length_and_is_the_same_stream_per_rank():
    cfg = config(seq_length=40, batch_size=8)
    x, y = train_batch(cfg, 0, 7, length=10)
    assert x.shape == (8, 9, 10) and y.shape == (8,)
    assert torch.equal(x.argmax(-1)[:, 0], y)                                      # still palindromes
    assert torch.equal(train_batch(cfg, 0, 7, length=10)[0], x)                    # reproducible
    assert not torch.equal(train_batch(cfg, 1, 7, length=10)[0], x)                # each rank its own
    assert train_batch(cfg, 0, 7)[0].shape == (8, 39, 10)                          # default: T


@pytest.mark.parametrize("flags, needle", [(["--curriculum-start", "1"], "--curriculum-start"),
                                           (["--curriculum-start", "50"], "--curriculum-start"),
                                           (["--curriculum-growth", "1"], "--curriculum-growth"),
                                           (["--curriculum-acc", "1.5"], "--curriculum-acc")])
def test_bad_curriculum_flags_give_one_line_and_exit_2(flags, needle, tmp_path):
    proc = run_script(["trainers/lstm.py", "--curriculum", "--seq-length", "40", *flags, "--out-dir", tmp_path])
    assert_usage_error(proc, needle)
    assert not any(tmp_path.iterdir())                                             # before training starts


SMALL = dict(seq_length=16, curriculum=True, hidden_dim=16, batch_size=32, lr=1e-2, log_every=10, eval_every=40,
             val_size=200, progress=False, num_threads=1)


def history_of(run: Path) -> list[dict]:
    last = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
    return read_meta(last)["extra"]["history"]


def test_a_run_follows_the_rule_and_validates_at_the_target_t(tmp_path):
    cfg = build(LSTMConfig, **SMALL, steps=200, out_dir=str(tmp_path), run_name="rule")
    metrics = train(cfg)
    run = tmp_path / "rule"
    history = history_of(run)
    # the oracle: replay the rule on the logged training accuracy, a log window at a time
    lengths, length, expected = [2, 4, 8, 16], 2, [{"step": 0, "T": 2}]
    for row in (r for r in history if "train/acc" in r):
        if row["train/acc"] >= 0.99 and length < 16:
            length = lengths[lengths.index(length) + 1]
            expected.append({"step": row["step"], "T": length})
    assert metrics["curriculum"] == expected
    assert json.loads((run / "metrics.json").read_text())["curriculum"] == expected
    assert len(expected) >= 3, "too few advances in 200 steps to test the rule"
    # validation is at the target T: the final weights, evaluated here on the T=16 set, give val/acc
    model = build_model(cfg)
    model.load_state_dict(load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    x, y = validation_set(cfg)[:]
    assert x.shape[1] == 15
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(metrics["val/acc"], abs=1e-6)
    # wandb: the training length as a scalar at each change, and the run's tag
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_offline_run(wandb_file)
    assert [{"step": h["_step"], "T": h["curriculum/T"]} for h in logged["history"] if "curriculum/T" in h] == expected
    assert "curriculum" in logged["run"]["tags"]
    # the figures: the curves and the memory figure, as images
    import matplotlib.image as mpimg
    for name in ("curves", "gates", "memory"):
        image = mpimg.imread(run / "figures" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0, name


def test_a_resume_in_the_middle_of_the_curriculum_is_bit_exact(tmp_path):
    steps = 160
    ref = build(LSTMConfig, **SMALL, steps=steps, checkpoint_every=40, wandb=False, out_dir=str(tmp_path),
                run_name="ref")
    advances = train(ref)["curriculum"]
    assert len(advances) >= 3, advances
    cut_at = advances[1]["step"] + 10                  # a log step after the first advance, before the last
    assert cut_at < advances[-1]["step"], advances
    cut = build(LSTMConfig, **SMALL, steps=cut_at, checkpoint_every=40, wandb=False, out_dir=str(tmp_path),
                run_name="cut")
    assert train(cut)["curriculum"] == [a for a in advances if a["step"] <= cut_at]
    resumed = train(build(LSTMConfig, **SMALL, steps=steps, checkpoint_every=40, wandb=False,
                          out_dir=str(tmp_path), run_name="cut", resume=True))
    assert resumed["curriculum"] == advances
    a = load_file(sorted((tmp_path / "ref" / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    b = load_file(sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_processes_advance_together_on_their_mean_accuracy(tmp_path):
    """2 CPU processes (gloo): every rank trains at the same length at every step (their weights end
    equal), on batches of its own, and the advances follow the rule on the mean over ranks."""
    flags = ["--seq-length", "16", "--curriculum", "--hidden-dim", "16", "--batch-size", "32", "--lr", "1e-2",
             "--log-every", "10", "--eval-every", "40", "--val-size", "200", "--no-progress", "--num-threads", "1",
             "--steps", "120", "--out-dir", str(tmp_path), "--run-name", "two"]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                           "trainers/lstm.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=clean_env(TORCH_DISTRIBUTED_DEBUG="DETAIL", PALGAN_DEBUG="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "two"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(metrics["curriculum"]) >= 2
    facts = rank_facts(run)
    assert len(facts["weights"]) == 2 and len(set(facts["weights"])) == 1
    cfg = build(LSTMConfig, curriculum=True, seq_length=16, batch_size=32)
    assert facts["first_batch"] == [debug.fingerprint(*train_batch(cfg, r, 1, 2)) for r in range(2)]
    assert facts["first_batch"][0] != facts["first_batch"][1]
    length, expected = 2, [{"step": 0, "T": 2}]
    for row in (r for r in history_of(run) if "train/acc" in r):   # the mean over both ranks
        if row["train/acc"] >= 0.99 and length < 16:
            length *= 2
            expected.append({"step": row["step"], "T": length})
    assert metrics["curriculum"] == expected
