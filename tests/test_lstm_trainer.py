"""The palindrome trainer end to end: files on disk, the offline wandb run, resume, bad input."""
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, assert_usage_error, clean_env, run_script, signal_when, wait_for
from trainers.cli import UsageError, build, from_saved, override, parse, run_cli
from trainers.lstm_plots import plot_curves, plot_gates
from trainers.lstm import (LSTMConfig, build_model, main, palindromes, train, train_batch,
                           validation_set)
from trainers.runtime import generator_for
from wandb_files import read_offline_run

TINY = ["--hidden-dim", "16", "--val-size", "200", "--batch-size", "32", "--no-progress"]


def tiny_config(tmp_path, **kw) -> LSTMConfig:
    base = dict(hidden_dim=16, val_size=200, batch_size=32, steps=40, eval_every=20, log_every=10,
                checkpoint_every=20, out_dir=str(tmp_path), wandb=False, progress=False)
    base.update(kw)
    return build(LSTMConfig, **base)


# --- data -------------------------------------------------------------------------------------

def test_palindromes_are_palindromes_and_target_is_first_digit():
    for length in (2, 5, 6, 21):
        d = palindromes(500, length, generator_for(0, length))
        assert torch.equal(d, d.flip(1))
        assert d.min() >= 0 and d.max() <= 9
    cfg = build(LSTMConfig, seq_length=7)
    x, y = train_batch(cfg, rank=0, step=3)
    assert x.shape == (128, 6, 10) and torch.equal(x[:, 0].argmax(-1), y)


def test_batches_are_pure_functions_of_seed_rank_step():
    cfg = build(LSTMConfig)
    a, b = train_batch(cfg, 0, 5), train_batch(cfg, 0, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(train_batch(cfg, 1, 5)[0], a[0])            # ranks differ
    assert not torch.equal(train_batch(cfg, 0, 6)[0], a[0])            # steps differ
    assert not torch.equal(train_batch(override(cfg, seed=1), 0, 5)[0], a[0])
    v1, v2 = validation_set(cfg).tensors, validation_set(override(cfg, seed=9)).tensors
    assert torch.equal(v1[0], v2[0]) and len(v1[0]) == 10_000          # fixed whatever the seed


def test_scalar_encoding_is_one_dimensional():
    x, y = train_batch(build(LSTMConfig, input_encoding="scalar", seq_length=6), 0, 0)
    assert x.shape == (128, 5, 1) and torch.equal(x[:, 0, 0].long(), y)


# --- end to end through the CLI, wandb offline --------------------------------------------------

def wandb_view(run_file: Path, *flags: str):
    """wandb's own reading of an offline run: ``wandb leet inspect --json`` (records, one per line)
    or with ``--summary`` (state, config, summary), independent of ``read_offline_run``."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_file)],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    if flags:
        return json.loads(proc.stdout)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def same_pixels(a: Path, b: Path) -> bool:
    x, y = mpimg.imread(a), mpimg.imread(b)
    return x.shape == y.shape and float(np.abs(x - y).mean()) < 1e-4


def test_cli_run_writes_metrics_figures_checkpoints_and_offline_wandb(tmp_path):
    proc = run_script(["trainers/lstm.py", *TINY, "--steps", "60", "--eval-every", "30", "--log-every", "10",
                       "--checkpoint-every", "20", "--keep-checkpoints", "2", "--out-dir", tmp_path,
                       "--run-name", "e2e"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "e2e"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["finished"] and metrics["config"]["hidden_dim"] == 16
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000040", "step_00000060"]                    # the last k=2
    meta = json.loads((run / "checkpoints" / "step_00000060" / "palgan.json").read_text())
    assert meta["step"] == 60 and meta["config"]["seq_length"] == 5

    # the reported validation numbers are those of the saved weights on the validation set, counted here
    cfg = from_saved(LSTMConfig, metrics["config"])
    model = build_model(cfg)
    model.load_state_dict(load_file(run / "checkpoints" / "step_00000060" / "model.safetensors"))
    x, y = validation_set(cfg).tensors
    with torch.no_grad():
        logits = model.eval()(x)
    assert len(y) == 200
    assert metrics["val/acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)

    wandb_files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1
    logged = read_offline_run(wandb_files[0])
    rows = logged["history"]
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/acc" in r]
    assert [r["_step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
    assert [r["_step"] for r in val_rows] == [30, 60]
    assert val_rows[-1]["val/acc"] == pytest.approx(metrics["val/acc"])
    for key in ("figures/curves", "figures/gates"):
        image = [r for r in rows if f"{key}/path" in r]
        assert image and image[0][f"{key}/_type"] == "image-file"
    assert logged["config"]["seq_length"] == 5

    # wandb's own view of the same run (wandb leet inspect), not the reader above
    summary = wandb_view(wandb_files[0], "--summary")
    assert summary["state"] == "finished" and summary["exit_code"] == 0 and summary["name"] == "e2e"
    assert summary["config"] == {k: v for k, v in metrics["config"].items()}
    assert summary["summary"]["val/acc"] == pytest.approx(metrics["val/acc"])
    assert summary["summary"]["train/loss"] == pytest.approx(metrics["train/loss"])
    history = [r["history"]["item"] for r in wandb_view(wandb_files[0]) if r["type"] == "history"]
    scalars = ("train/loss", "train/acc", "val/loss", "val/acc")
    assert [{k: r[k] for k in ("_step", *scalars) if k in r} for r in history if set(scalars) & set(r)] == \
        [{k: r[k] for k in ("_step", *scalars) if k in r} for r in rows if set(scalars) & set(r)]
    for fig in ("curves", "gates"):   # the figures wandb holds are the ones in figures/
        logged_image = summary["summary"][f"figures/{fig}"]
        assert logged_image["sha256"] == hashlib.sha256((run / "figures" / f"{fig}.png").read_bytes()).hexdigest()
        assert (wandb_files[0].parent / "files" / logged_image["path"]).read_bytes() == \
            (run / "figures" / f"{fig}.png").read_bytes()

    # the figures show this run: the curves of the history wandb logged, the gates of the saved weights
    redrawn = [{"step": r["_step"], **{k: r[k] for k in scalars[2 * s:2 * s + 2]}}
               for r in history for s in (0, 1) if scalars[2 * s] in r]
    plot_curves(redrawn, tmp_path / "curves.png")
    assert same_pixels(run / "figures" / "curves.png", tmp_path / "curves.png")
    plot_gates(model, *validation_set(cfg)[0:1], tmp_path / "gates.png")
    assert same_pixels(run / "figures" / "gates.png", tmp_path / "gates.png")


def test_cli_run_with_eager_backend_scalar_input_and_bf16(tmp_path):
    """The three switches users can flip on the default command, together, end to end: the saved
    weights take 1-d inputs, and the validation numbers are theirs under bf16 autocast."""
    proc = run_script(["trainers/lstm.py", *TINY, "--steps", "20", "--eval-every", "10", "--checkpoint-every", "10",
                       "--backend", "eager", "--input-encoding", "scalar", "--mixed-precision", "bf16",
                       "--out-dir", tmp_path, "--run-name", "switches"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "switches"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 20
    assert (metrics["config"]["backend"], metrics["config"]["input_encoding"], metrics["config"]["mixed_precision"]) \
        == ("eager", "scalar", "bf16")
    weights = load_file(run / "checkpoints" / "step_00000020" / "model.safetensors")
    assert weights["W_x"].shape == (1, 64) and weights["W_x"].dtype == torch.float32   # fp32 master weights
    cfg = from_saved(LSTMConfig, metrics["config"])
    model = build_model(cfg).eval()
    model.load_state_dict(weights)
    x, y = validation_set(cfg).tensors
    assert x.shape[-1] == 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).float()
    assert metrics["val/acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=0.011)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=0.02)
    [wandb_file] = run.glob("wandb/offline-run-*/run-*.wandb")
    assert wandb_view(wandb_file, "--summary")["state"] == "finished"


def test_null_tracker_when_wandb_is_off_or_missing(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, run_name="off"))
    assert not (tmp_path / "off" / "wandb").exists()
    monkeypatch.setattr("trainers.tracking.wandb_installed", lambda: False)
    train(tiny_config(tmp_path, run_name="missing", wandb=True))
    assert not (tmp_path / "missing" / "wandb").exists()
    assert (tmp_path / "missing" / "metrics.json").exists()


def test_return_states_feed_the_gate_plot_for_the_rnn_too(tmp_path):
    metrics = train(tiny_config(tmp_path, model="rnn", run_name="rnn", steps=20))
    assert metrics["steps"] == 20 and (tmp_path / "rnn" / "figures" / "gates.png").stat().st_size > 1000


# --- resume ------------------------------------------------------------------------------------

def final_weights(run: Path) -> dict:
    last = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(last / "model.safetensors")


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    args = ["trainers/lstm.py", *TINY, "--steps", "600", "--eval-every", "300", "--checkpoint-every", "100",
            "--no-wandb", "--out-dir", tmp_path]
    ref = run_script([*args, "--run-name", "ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]

    child = subprocess.Popen([sys.executable, *map(str, args), "--run-name", "cut"], cwd=ROOT,
                             env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "cut" / "checkpoints" / "step_00000200"
    signal_when(child, first.exists, signal.SIGKILL, f"checkpoint {first.name} to appear", timeout=120)
    child.communicate()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut" / "metrics.json").exists()

    resumed = run_script([*args, "--run-name", "cut", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["steps"] == 600


def test_one_writer_per_run_folder_until_the_holder_dies(tmp_path):
    """While a run trains, a second launch on its folder, with or without --resume, stops with one
    line naming the process that holds it and leaves the folder alone; SIGKILL frees it."""
    args = ["trainers/lstm.py", *TINY, "--steps", "1000000", "--eval-every", "100", "--checkpoint-every", "100",
            "--no-wandb", "--out-dir", tmp_path, "--run-name", "busy"]
    child = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=clean_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "busy"
    wait_for(child, (run / "checkpoints" / "step_00000100").exists, "the first checkpoint")
    for extra in (["--resume"], []):
        assert_usage_error(run_script([*args, *extra]), f"run folder {run} is in use by process {child.pid} on ")
    assert child.poll() is None, "the first run ended before the second launches were tried"
    assert not (run / "metrics.json").exists()   # the refused launches wrote no record of their own
    child.kill()
    child.communicate()
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    resumed = run_script([*args[:-2], "--run-name", "busy", "--resume", "--steps", str(int(last.name[5:]) + 20)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]   # the kernel released the dead holder's lock
    assert json.loads((run / "metrics.json").read_text())["finished"]


# --- bad input ---------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--seq-length", "1"], "--seq-length"),
    (["--seq-length", "abc"], "--seq-length"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--hidden-dim", "0"], "--hidden-dim"),
    (["--clip-norm", "-1"], "--clip-norm"),
    (["--model", "gru"], "--model"),
    (["--backend", "cuda-graphs"], "--backend"),
    (["--input-encoding", "binary"], "--input-encoding"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_give_one_line_and_exit_2(flags, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*flags, "--out-dir", str(tmp_path), "--no-wandb"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())                                  # nothing was written


def test_bad_input_with_plain_python(tmp_path):
    assert_usage_error(run_script(["trainers/lstm.py", "--seq-length", "x"]), "--seq-length")
    assert_usage_error(run_script(["trainers/lstm.py", "--lr", "nan", "--out-dir", tmp_path]), "--lr")
    assert_usage_error(run_script(["trainers/lstm.py", "--resume", "--out-dir", tmp_path, "--no-wandb"]),
                       "--resume", "no checkpoint")


def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path):
    train(tiny_config(tmp_path, run_name="c", steps=20))
    ckpt = tmp_path / "c" / "checkpoints" / "step_00000020"
    (ckpt / "model.safetensors").write_bytes(b"not a tensor file")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    metrics_before = (tmp_path / "c" / "metrics.json").read_bytes()
    proc = run_script(["trainers/lstm.py", *TINY, "--steps", "40", "--no-wandb", "--out-dir", tmp_path,
                       "--run-name", "c", "--resume"])
    assert_usage_error(proc, "step_00000020", "cannot be loaded")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert (tmp_path / "c" / "metrics.json").read_bytes() == metrics_before


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    train(tiny_config(tmp_path, run_name="r", steps=20))
    with pytest.raises(UsageError, match="--resume"):
        train(tiny_config(tmp_path, run_name="r", steps=20))


def test_nan_loss_stops_with_a_usage_error_and_keeps_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, run_name="nan", steps=20, lr=1e38, clip_norm=0.0, checkpoint_every=1)
    with pytest.raises(UsageError, match="--lr"):
        train(cfg)
    assert list((tmp_path / "nan" / "checkpoints").iterdir())


def test_help_shows_kebab_flags_with_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(LSTMConfig, ["--help"], "x", "x")
    out = capsys.readouterr().out
    for flag in ("--seq-length", "--input-encoding", "--hidden-dim", "--clip-norm", "--eval-every",
                 "--checkpoint-every", "--no-wandb", "--mixed-precision", "--out-dir", "--run-name", "--resume"):
        assert flag in out, flag
    assert "default: 10000" in out and "default: 0.001" in out
