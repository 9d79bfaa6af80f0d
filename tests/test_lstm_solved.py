"""How a palindrome run ends and what it leaves: the solved stop, the best checkpoint beside the
latest, best and last accuracy in metrics.json, and a finished record of a failed run. Oracles: the
history stored in the run's checkpoints, and the weights of each checkpoint evaluated again with a
plain loop over the validation set."""
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainers.lstm as lstm_trainer
from trainers.cli import UsageError, build
from trainers.lstm import LSTMConfig, build_model, train, validation_set
from wandb_files import read_offline_run


def tiny(tmp_path, **kw) -> LSTMConfig:
    base = dict(hidden_dim=8, val_size=200, batch_size=32, eval_every=10, log_every=10, checkpoint_every=10,
                out_dir=str(tmp_path), progress=False, num_threads=1)
    base.update(kw)
    return build(LSTMConfig, **base)


def accuracy_of(ckpt: Path, cfg: LSTMConfig) -> float:
    """The checkpoint's weights in a fresh model, over the whole validation set."""
    model = build_model(cfg)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    x, y = validation_set(cfg).tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def val_history(ckpt: Path) -> list[tuple[int, float]]:
    meta = json.loads((ckpt / "palgan.json").read_text())
    return [(r["step"], r["val/acc"]) for r in meta["extra"]["history"] if "val/acc" in r]


def wandb_run(run_dir: Path, timeout: float = 60) -> dict:
    """The run's offline wandb file once its exit record is in (wandb's service writes the end of
    the file shortly after ``finish()`` returns)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while (run := read_offline_run(path))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return run


def test_a_run_that_holds_the_solved_accuracy_ends_there_as_solved(tmp_path):
    # T=2 (one input digit) is learnt within a few dozen steps
    cfg = tiny(tmp_path, seq_length=2, lr=1e-2, steps=400, stop_when_solved=2)
    metrics = train(cfg)
    ckpts = sorted((cfg.run_dir / "checkpoints").glob("step_*"))
    history = val_history(ckpts[-1])
    (*before, (first, acc1), (second, acc2)) = history
    assert acc1 >= cfg.eval.solved_acc and acc2 >= cfg.eval.solved_acc
    assert all(acc < cfg.eval.solved_acc for _, acc in before[-1:])    # it ended at the first chance it had
    assert metrics["stop_reason"] == "solved" and metrics["finished"]
    assert metrics["steps"] == second < cfg.optim.steps and metrics["steps_to_solve"] == first
    assert int(ckpts[-1].name.split("_")[1]) == second              # a checkpoint where it stopped
    assert accuracy_of(ckpts[-1], cfg) == pytest.approx(metrics["last_val_acc"]) == pytest.approx(acc2)
    on_disk = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert on_disk["stop_reason"] == "solved" and on_disk["steps_to_solve"] == first
    run = wandb_run(cfg.run_dir)
    assert run["exit_code"] == 0 and run["summary"]["stop_reason"] == "solved"
    assert run["summary"]["steps_to_solve"] == first


def test_a_run_whose_last_evaluation_is_worse_than_its_best_reports_both(tmp_path, monkeypatch):
    built = []

    def keep_model(cfg):
        built.append(build_model(cfg))
        return built[-1]

    def spoil_after_step_40(step, metrics, ckpt):
        if step == 40:   # flip the readout: the next validations fall far below the best
            with torch.no_grad():
                built[0].W_ph.neg_()
                built[0].b_p.neg_()

    monkeypatch.setattr(lstm_trainer, "build_model", keep_model)
    cfg = tiny(tmp_path, seq_length=3, lr=1e-2, steps=60)
    metrics = train(cfg, on_eval=spoil_after_step_40)

    latest = sorted((cfg.run_dir / "checkpoints").glob("step_*"))[-1]
    history = dict(val_history(latest))
    best_step = max(history, key=lambda s: (history[s], -s))
    assert metrics["last_step"] == 60 and metrics["last_val_acc"] == pytest.approx(history[60])
    assert metrics["best_step"] == best_step <= 40 and metrics["best_val_acc"] == pytest.approx(history[best_step])
    assert metrics["best_val_acc"] > metrics["last_val_acc"] + 0.2
    assert metrics["stop_reason"] == "completed" and metrics["steps_to_solve"] is None

    (best,) = (cfg.run_dir / "checkpoints" / "best").iterdir()   # one best checkpoint, beside the latest
    assert best == Path(metrics["best_checkpoint"]) and best.name == f"step_{best_step:08d}"
    assert accuracy_of(best, cfg) == pytest.approx(metrics["best_val_acc"])
    assert accuracy_of(latest, cfg) == pytest.approx(metrics["last_val_acc"])
    summary = wandb_run(cfg.run_dir)["summary"]
    assert summary["best_val_acc"] == pytest.approx(metrics["best_val_acc"]) and summary["best_step"] == best_step
    assert summary["last_val_acc"] == pytest.approx(metrics["last_val_acc"]) and summary["last_step"] == 60


def test_a_failed_run_leaves_metrics_and_a_finished_wandb_run(tmp_path, monkeypatch):
    built = []

    def keep_model(cfg):
        built.append(build_model(cfg))
        return built[-1]

    def poison_at_step_20(step, metrics, ckpt):
        if step == 20:
            with torch.no_grad():
                built[0].W_ph.fill_(float("nan"))

    monkeypatch.setattr(lstm_trainer, "build_model", keep_model)
    cfg = tiny(tmp_path, seq_length=3, steps=60)
    with pytest.raises(UsageError, match="loss became nan at step 21"):
        train(cfg, on_eval=poison_at_step_20)
    metrics = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert metrics["stop_reason"] == "failed" and not metrics["finished"] and metrics["steps"] == 21
    assert "loss became nan" in metrics["error"] and metrics["last_step"] == 20
    run = wandb_run(cfg.run_dir)
    assert run["exit_code"] is not None and run["summary"]["stop_reason"] == "failed"
    assert "loss became nan" in run["summary"]["error"]


@pytest.mark.parametrize("flags,needle", [({"stop_when_solved": -1}, "--stop-when-solved"),
                                          ({"solved_acc": 1.5}, "--solved-acc"),
                                          ({"solved_acc": float("nan")}, "--solved-acc")])
def test_bad_solved_settings_are_refused_before_training(tmp_path, flags, needle):
    with pytest.raises(UsageError, match=needle):
        train(tiny(tmp_path, **flags))
    assert not any(tmp_path.iterdir())
