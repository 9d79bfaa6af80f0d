"""Train the from-scratch LSTM (or the vanilla RNN) on palindromes, under HF Accelerate.

    python trainers/lstm.py                                  # the report's config: T=5, 10k steps
    accelerate launch trainers/lstm.py --seq-length 20       # same, through accelerate
    accelerate launch --config_file launch/cpu_2proc.yaml trainers/lstm.py --seq-length 20
    python trainers/lstm.py --model rnn --seq-length 20      # the baseline
    python -m trainers.lstm --help

Writes <out-dir>/<run-name>/{metrics.json, figures/curves.png, figures/gates.png, checkpoints/}:
metrics.json holds the last and the best validation (accuracy and step) and why the run ended;
checkpoints/best/ the checkpoint of the best validation, beside the latest ones.
--batch-size is per process: with N processes the global batch is N x batch-size.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from models.lstm import BACKENDS, LSTM
from models.rnn import RNN
from trainers.checkpoint import (PREFIX, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
                                 write_json_atomic)
from trainers.cli import (UsageError, arg, parse_config, require_at_least, require_non_negative,
                          require_positive, run_cli, validate_field_choices)
from trainers.figures import plt, save_figure
from trainers.runtime import (MIXED_PRECISION, RunConfig, StopFlag, check_run_dir_is_free,
                              collective_failures, fingerprint, gather_fingerprints, generator_for,
                              launched_processes, make_accelerator)
from trainers.tracking import start_tracker

NUM_CLASSES = 10      # digits 0-9
VAL_STREAM = 7_777    # seed key of the validation set, apart from every training stream
BEST = "best"         # <run>/checkpoints/best/step_*: the checkpoint of the best validation so far
# what the run's tracker summary and metrics.json report about how the run ended
SUMMARY_KEYS = ("stop_reason", "best_val_acc", "best_step", "last_val_acc", "last_step", "steps_to_solve")


@dataclass
class LSTMConfig(RunConfig):
    # data
    seq_length: int = arg(5, "palindrome length T; the input is its first T-1 digits", "data")
    input_encoding: str = arg("onehot", "digit encoding: one-hot (10-d) or the 1-d scalar of the course template",
                              "data", ("onehot", "scalar"))
    val_size: int = arg(10_000, "size of the fixed validation set", "data")
    # model
    model: str = arg("lstm", "lstm (equations 1-8) or the vanilla rnn baseline", "model", ("lstm", "rnn"))
    hidden_dim: int = arg(128, "hidden units H", "model")
    backend: str = arg("script", "time loop: script (TorchScript) or eager (plain Python)", "model", BACKENDS)
    forget_bias: float = arg(1.0, "initial forget-gate bias b_f (the report's init is 0)", "model")
    # optimisation
    lr: float = arg(1e-3, "RMSprop learning rate", "optimisation")
    batch_size: int = arg(128, "sequences per step, per process", "optimisation")
    steps: int = arg(10_000, "training steps", "optimisation")
    clip_norm: float = arg(10.0, "max gradient norm (0 turns clipping off)", "optimisation")
    mixed_precision: str = arg("no", "autocast precision", "optimisation", MIXED_PRECISION)
    num_threads: int = arg(0, "torch CPU threads per process (0: torch's default); 1 avoids OpenMP "
                              "spin-waits when other jobs share the cores", "optimisation")
    # evaluation and logging
    eval_every: int = arg(500, "steps between validation passes", "evaluation")
    log_every: int = arg(50, "steps between train/* scalars", "evaluation")
    solved_acc: float = arg(0.999, "validation accuracy that counts as solved", "evaluation")
    stop_when_solved: int = arg(0, "end the run as solved once val/acc >= --solved-acc at this many "
                                   "consecutive validations (0: train all --steps)", "evaluation")
    # logging and run: RunConfig's fields (wandb, out_dir, run_name, seed, resume, checkpoints, ...)

    def validate(self) -> None:
        validate_field_choices(self)
        require_at_least(self.seq_length, 2, "seq_length")
        require_positive(self.lr, "lr")
        for name in ("steps", "batch_size", "hidden_dim", "eval_every", "log_every", "val_size",
                     "checkpoint_every", "keep_checkpoints", "dist_timeout"):
            require_at_least(getattr(self, name), 1, name)
        require_non_negative(self.clip_norm, "clip_norm")
        require_at_least(self.num_threads, 0, "num_threads")
        require_at_least(self.stop_when_solved, 0, "stop_when_solved")
        if not 0 < self.solved_acc <= 1:
            raise UsageError(f"--solved-acc must lie in (0, 1], got {self.solved_acc}")
        if not math.isfinite(self.forget_bias):
            raise UsageError(f"--forget-bias must be finite, got {self.forget_bias}")

    @property
    def input_dim(self) -> int:
        return NUM_CLASSES if self.input_encoding == "onehot" else 1

    def default_name(self) -> str:
        return f"{self.model}-T{self.seq_length}-h{self.hidden_dim}-s{self.seed}"


# --- data --------------------------------------------------------------------------------

def palindromes(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, length)`` random digit palindromes: d_i = d_{length-1-i}."""
    half = torch.randint(0, NUM_CLASSES, (n, (length + 1) // 2), generator=generator)
    return torch.cat([half, half[:, : length // 2].flip(1)], dim=1)


def encode(digits: torch.Tensor, encoding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, T-1, D)`` from the first T-1 digits; the target is the last digit."""
    inputs, target = digits[:, :-1], digits[:, -1]
    if encoding == "onehot":
        return F.one_hot(inputs, NUM_CLASSES).float(), target
    return inputs.unsqueeze(-1).float(), target


def train_batch(cfg: LSTMConfig, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` on ``rank``: a pure function of (seed, rank, step)."""
    return encode(palindromes(cfg.batch_size, cfg.seq_length, generator_for(cfg.seed, rank, step)),
                  cfg.input_encoding)


def validation_set(cfg: LSTMConfig) -> TensorDataset:
    """Fixed for a given T and size, whatever the training seed, so runs compare."""
    digits = palindromes(cfg.val_size, cfg.seq_length, generator_for(VAL_STREAM, cfg.seq_length))
    return TensorDataset(*encode(digits, cfg.input_encoding))


# --- model, evaluation, figures ------------------------------------------------------------

def build_model(cfg: LSTMConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.model == "lstm":
        return LSTM(cfg.input_dim, cfg.hidden_dim, NUM_CLASSES, backend=cfg.backend, forget_bias=cfg.forget_bias)
    return RNN(cfg.input_dim, cfg.hidden_dim, NUM_CLASSES, backend=cfg.backend)


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    """Validation loss and accuracy over the whole set, gathered across ranks."""
    model.eval()
    losses, hits = [], []
    for x, y in loader:
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        loss, hit = accelerator.gather_for_metrics((loss, (logits.argmax(1) == y).float()))
        losses.append(loss)
        hits.append(hit)
    model.train()
    return {"val/loss": torch.cat(losses).mean().item(), "val/acc": torch.cat(hits).mean().item()}


def validation_record(history: list[dict], solved_acc: float) -> dict:
    """The best and the last validation of a run, from its history: the accuracy and step of each
    (the earliest step of the best), and the streak of validations at >= ``solved_acc`` that the
    history ends in (its length, and its first step as ``steps_to_solve``; None if there is none)."""
    out = {"best_val_acc": None, "best_step": None, "last_val_acc": None, "last_step": None,
           "steps_to_solve": None, "solved_streak": 0}
    for row in history:
        if "val/acc" not in row:
            continue
        acc, step = row["val/acc"], row["step"]
        if out["best_val_acc"] is None or acc > out["best_val_acc"]:
            out["best_val_acc"], out["best_step"] = acc, step
        out["last_val_acc"], out["last_step"] = acc, step
        if acc >= solved_acc:
            out["solved_streak"] += 1
            out["steps_to_solve"] = out["steps_to_solve"] or step
        else:
            out["solved_streak"], out["steps_to_solve"] = 0, None
    return out


def end_record(history: list[dict], cfg: LSTMConfig) -> dict:
    """What metrics.json says about the validations of a run (see ``validation_record``)."""
    record = validation_record(history, cfg.solved_acc)
    return {k: record[k] for k in SUMMARY_KEYS if k in record}


def plot_curves(history: list[dict], path: Path) -> Path:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in history if f"{split}/acc" in r]
        steps = [r["step"] for r in rows]
        ax_acc.plot(steps, [r[f"{split}/acc"] for r in rows], style, label=split, ms=3)
        ax_loss.plot(steps, [r[f"{split}/loss"] for r in rows], style, label=split, ms=3)
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


@torch.no_grad()
def plot_gates(model, cfg: LSTMConfig, path: Path) -> Path:
    """For one sample palindrome: mean i, f, o per step, then c and h (means and heatmaps)."""
    x, y = validation_set(cfg)[0:1]
    logits, states = model(x.to(next(model.parameters()).device), return_states=True)
    digits = (x[0].argmax(-1) if cfg.input_encoding == "onehot" else x[0, :, 0]).long().tolist()
    # "t=step" over each digit while they fit; past 10 steps the digits alone (the title gives the order)
    ticks = [f"t={t}\n{d}" for t, d in enumerate(digits)] if len(digits) <= 10 else [str(d) for d in digits]
    steps = range(len(digits))
    s = {k: v[0].float().cpu() for k, v in states.items()}   # each (L, H)
    title = (f"{cfg.model.upper()} on {''.join(map(str, digits))}? -> predicts "
             f"{logits.argmax(1).item()} (target {y.item()})")
    if "i" not in s:  # the RNN has no gates: show its hidden state only
        fig, ax = plt.subplots(figsize=(7, 4))
        im = ax.imshow(s["h"].T, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(xticks=list(steps), xticklabels=ticks, ylabel="hidden unit", title=title)
        fig.colorbar(im, ax=ax, label="h")
        return save_figure(fig, path)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, name) in zip(axes[0], (("i", "input gate i"), ("f", "forget gate f"), ("o", "output gate o"))):
        mean, std = s[key].mean(1), s[key].std(1)
        ax.plot(steps, mean, "o-")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.set(title=f"{name}: mean over units (+/- std)", ylim=(0, 1), xticks=list(steps), xticklabels=ticks)
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    ax.plot(steps, s["c"].mean(1), "o-", label="c (cell)")
    ax.plot(steps, s["h"].mean(1), "s-", label="h (hidden)")
    ax.plot(steps, s["c"].abs().mean(1), "--", label="|c|")
    ax.set(title="cell and hidden state: mean over units", xticks=list(steps), xticklabels=ticks)
    ax.legend()
    ax.grid(alpha=0.3)
    for ax, key in zip(axes[1, 1:], ("c", "h")):
        lim = float(s[key].abs().max()) or 1.0
        im = ax.imshow(s[key].T, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set(title=f"{key} per hidden unit", ylabel="unit", xticks=list(steps), xticklabels=ticks)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.subplots_adjust(hspace=0.45)
    return save_figure(fig, path)


@torch.no_grad()
def state_means(model, cfg: LSTMConfig) -> tuple[list[int], dict[str, list[float]]]:
    """The lines of the gate plot's top row and first panel: time steps, and per step the mean over
    units of each gate (the LSTM's i, f, o) and of c and h, on the same validation palindrome."""
    x, _ = validation_set(cfg)[0:1]
    _, states = model(x.to(next(model.parameters()).device), return_states=True)
    names = {"i": "input gate i", "f": "forget gate f", "o": "output gate o", "c": "cell c", "h": "hidden h"}
    means = {label: states[k][0].float().mean(1).cpu().tolist() for k, label in names.items() if k in states}
    return list(range(x.shape[1])), means


# --- the loop ------------------------------------------------------------------------------

def train(cfg: LSTMConfig, on_eval: Callable[[int, dict, Path | None], str | None] | None = None) -> dict:
    """Train under an Accelerator; return the final metrics. ``on_eval(step, metrics, ckpt)``
    is called after every validation pass (Ray Tune reports through it); a string it returns
    ends the run there, recorded as the reason (``stop_reason``: completed, solved, interrupted,
    failed, or that string). The best validation's checkpoint is kept in checkpoints/best/."""
    cfg.validate()
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    check_run_dir_is_free(run_dir, cfg.resume)
    resume_from = latest_checkpoint(ckpt_dir) if cfg.resume else None

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with collective_failures(launched_processes(), cfg.dist_timeout, ckpt_dir):
        return train_loop(cfg, resume_from, on_eval)


def train_loop(cfg: LSTMConfig, resume_from: Path | None, on_eval=None) -> dict:
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    accelerator = make_accelerator(cfg.mixed_precision, cfg.wandb, run_dir, dist_timeout=cfg.dist_timeout)
    rank, config = accelerator.process_index, asdict(cfg)
    model = build_model(cfg)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)
    val_loader = DataLoader(validation_set(cfg), batch_size=1000, shuffle=False)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)

    start, history, wall_before = 0, [], 0.0
    if resume_from is not None:
        meta = load_checkpoint(accelerator, resume_from)
        start = meta["step"]
        history, wall_before = meta["extra"].get("history", []), meta["extra"].get("wall_time", 0.0)
        accelerator.print(f"resuming {run_dir.name} from step {start} ({resume_from.name})")

    best_dir = ckpt_dir / BEST
    if accelerator.is_main_process:   # a best checkpoint from after the resumed step belongs to a lost future
        for stale in list_checkpoints(best_dir):
            if int(stale.name[len(PREFIX):]) > start:
                shutil.rmtree(stale, ignore_errors=True)

    tracker = start_tracker(accelerator, cfg.wandb_project, cfg.name, config, run_dir, cfg.wandb_group or None,
                            job_type=cfg.wandb_job_type, tags=[cfg.model, f"T{cfg.seq_length}", cfg.input_encoding])
    stop = StopFlag()
    t0 = time.perf_counter()
    wall = lambda: wall_before + time.perf_counter() - t0  # noqa: E731
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name, dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_local_main_process))
    window_loss, window_hits, window_n = 0.0, 0.0, 0
    last_train, last_val, step = {}, {}, start

    def checkpoint(at: int) -> Path:
        return save_checkpoint(accelerator, ckpt_dir, at, config, cfg.keep_checkpoints,
                               extra={"history": history, "wall_time": wall()})

    model.train()
    reason = None   # why the loop ended early: solved, or what on_eval returned
    try:
        for step in range(start + 1, cfg.steps + 1):
            x, y = train_batch(cfg, rank, step)
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            logits = model(x).float()                       # (B, 10)
            loss = F.cross_entropy(logits, y)               # eq 8-9: softmax + NLL on the last step
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.clip_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise UsageError(f"the loss became {loss_value} at step {step}; lower --lr or --clip-norm "
                                 "(checkpoints already written are kept)")
            window_loss += loss_value
            window_hits += (logits.argmax(1) == y).float().mean().item()
            window_n += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                last_train = {"train/loss": window_loss / window_n, "train/acc": window_hits / window_n}
                window_loss, window_hits, window_n = 0.0, 0.0, 0
                history.append({"step": step, **last_train})
                tracker.log(last_train, step=step)
                bar.set_postfix(loss=f"{last_train['train/loss']:.3f}", acc=f"{last_train['train/acc']:.3f}")

            stopping = stop.should_stop(accelerator)
            evaluating = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluating:
                last_val = evaluate(model, val_loader, accelerator)
                history.append({"step": step, **last_val})
                tracker.log(last_val, step=step)
                record = validation_record(history, cfg.solved_acc)
                if record["best_step"] == step:   # every rank: the accuracy is gathered, so all agree
                    save_checkpoint(accelerator, best_dir, step, config, keep=1,
                                    extra={"history": history, "wall_time": wall()})
                if cfg.stop_when_solved and record["solved_streak"] >= cfg.stop_when_solved:
                    reason = "solved"
            ckpt = None
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping or reason:
                ckpt = checkpoint(step)
            if evaluating and on_eval is not None:
                reason = on_eval(step, {**last_train, **last_val, "step": step}, ckpt) or reason
            if stopping:
                accelerator.print(f"stop requested: checkpoint at step {step} written; rerun with --resume")
                break
            if reason:
                break
    except Exception as err:
        # a finished record of the failed run too: metrics.json and the tracker's summary
        bar.close()
        stop.restore()
        failed = {**last_train, **last_val, **end_record(history, cfg), "stop_reason": "failed",
                  "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300],
                  "steps": step, "wall_time_s": round(wall(), 2), "processes": accelerator.num_processes,
                  "finished": False, "config": config}
        if accelerator.is_main_process:
            write_json_atomic(run_dir / "metrics.json", failed)
        tracker.summary({k: failed[k] for k in SUMMARY_KEYS + ("error",) if failed.get(k) is not None})
        if accelerator.num_processes == 1:   # with several, the process exit ends the run (no collective here)
            tracker.finish()
        raise
    bar.close()
    stop.restore()

    unwrapped = accelerator.unwrap_model(model)
    reason = reason or ("completed" if step == cfg.steps else "interrupted")
    metrics = {**last_train, **last_val, **end_record(history, cfg), "stop_reason": reason, "steps": step,
               "wall_time_s": round(wall(), 2), "processes": accelerator.num_processes,
               "finished": reason != "interrupted", "config": config,
               "best_checkpoint": str(list_checkpoints(best_dir)[-1]) if list_checkpoints(best_dir) else None,
               # DDP replicas must stay bit-identical; each rank's first batch must differ
               "rank_weight_fingerprints": gather_fingerprints(accelerator, fingerprint(*unwrapped.parameters())),
               "rank_data_fingerprints": gather_fingerprints(accelerator, fingerprint(*train_batch(cfg, rank, 1)))}
    if accelerator.is_main_process:
        figures = {"figures/curves": plot_curves(history, run_dir / "figures" / "curves.png"),
                   "figures/gates": plot_gates(unwrapped, cfg, run_dir / "figures" / "gates.png")}
        write_json_atomic(run_dir / "metrics.json", metrics)
        tracker.log_images(figures, step=step)
        tracker.log_lines("gates/mean", *state_means(unwrapped, cfg), step=step, xname="t",
                          title="mean over units per time step, on the gate plot's palindrome")
    tracker.summary({k: metrics[k] for k in SUMMARY_KEYS + ("steps", "wall_time_s") if metrics.get(k) is not None})
    accelerator.print(f"{cfg.name}: val/acc {metrics.get('val/acc', float('nan')):.4f}  "
                      f"val/loss {metrics.get('val/loss', float('nan')):.4f}  steps {step}  "
                      f"wall {metrics['wall_time_s']:.1f}s  ({reason})  -> {run_dir}")
    accelerator.wait_for_everyone()
    tracker.finish()  # last: Accelerate's end_training also tears down the process group
    return metrics


def main(argv=None) -> dict:
    cfg = parse_config(LSTMConfig, argv, description=__doc__.splitlines()[0], prog="trainers/lstm.py")
    return train(cfg)


if __name__ == "__main__":
    run_cli(main)
