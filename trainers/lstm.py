"""Train the from-scratch LSTM (or the vanilla RNN) on palindromes, under HF Accelerate.

    python trainers/lstm.py                                  # the report's config: T=5, 10k steps
    python trainers/lstm.py --seq-length 20                  # longer palindromes
    python trainers/lstm.py --model rnn --seq-length 20      # the baseline
    accelerate launch --config_file launch/cpu_2proc.yaml trainers/lstm.py --seq-length 20
    python trainers/lstm.py --config my_run.yaml --lr 2e-3   # flags from a file, then the command line
    python trainers/lstm.py --seq-length 1000 --hidden-dim 64 --lr 1.5e-3 --forget-bias 5 --curriculum \
        --steps 8000 --eval-every 250 --solved-acc 0.99 --stop-when-solved 1 --num-threads 1   # T=1000
    python trainers/lstm.py export --checkpoint runs/<run>   # runs/<run>/model: safetensors, ONNX, .pt2, card

Writes <out-dir>/<run-name>/{metrics.json, figures/{curves,gates,memory}.png, checkpoints/}:
metrics.json holds the last and the best validation (accuracy and step) and why the run ended;
checkpoints/best/ the checkpoint of the best validation, beside the latest ones.
--curriculum trains on shorter palindromes first (T/8, then x2 each time the training accuracy reaches
--curriculum-acc) up to --seq-length; validation is always at --seq-length.
--batch-size is per process: with N processes the global batch is N x batch-size.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from models.lstm import LSTM
from models.rnn import RNN
from trainers import debug
from trainers.checkpoint import (BEST, PREFIX, elastic_batch, full_disk_is_one_line,
                                 list_checkpoints, load_checkpoint, read_meta, restart_note, resume_point,
                                 save_checkpoint)
from trainers.cli import (Log, Run, UsageError, check_choices, flatten, override, parse, require_at_least,
                          require_non_negative, require_positive, run_cli)
from trainers.files import write_json_atomic
from trainers.lstm_export import export_checkpoint, export_main, validation_at
from trainers.lstm_plots import plot_curves, plot_gates, plot_memory, state_means
from trainers.runtime import (StopFlag, collective_failures, generator_for, hold_run_dir,
                              launched_processes, make_accelerator)
from trainers.tracking import start_tracker

NUM_CLASSES = 10      # digits 0-9
VAL_STREAM = 7_777    # seed key of the validation set, apart from every training stream
# what the run's tracker summary and metrics.json report about how the run ended
SUMMARY_KEYS = ("stop_reason", "best_val_acc", "best_step", "last_val_acc", "last_step", "steps_to_solve")


# --- config ----------------------------------------------------------------------------------

@dataclass
class Data:
    """data"""
    seq_length: int = 5  # palindrome length T; the input is its first T-1 digits
    input_encoding: Literal["onehot", "scalar"] = "onehot"  # digits one-hot (10-d) or the course template's 1-d scalar
    val_size: int = 10_000  # size of the fixed validation set
    curriculum: bool = False  # train on shorter palindromes first, longer once they are learnt (validation stays at T)
    curriculum_start: int = 0  # the curriculum's first training length (0: T/8; at least 2)
    curriculum_growth: float = 2.0  # each advance multiplies the training length by this (capped at T)
    curriculum_acc: float = 0.99  # advance when the training accuracy over a log window reaches this


@dataclass
class Model:
    """model"""
    model: Literal["lstm", "rnn"] = "lstm"  # lstm (equations 1-8) or the vanilla rnn baseline
    hidden_dim: int = 128  # hidden units H
    backend: Literal["script", "eager", "compile"] = "script"  # time loop: script (TorchScript), eager or compile
    forget_bias: float = 1.0  # initial forget-gate bias b_f (the report's init is 0)
    rnn_init: Literal["default", "orthogonal", "identity"] = "default"  # the RNN's W_hh: N(0, 1/H), orthogonal, or I (Le et al. 2015)


@dataclass
class Optim:
    """optimisation"""
    lr: float = 1e-3  # RMSprop learning rate
    batch_size: int = 128  # sequences per step, per process
    steps: int = 10_000  # training steps
    clip_norm: float = 10.0  # max gradient norm (0 turns clipping off)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast precision
    num_threads: int = 0  # torch CPU threads per process (0: torch's default); 1 avoids OpenMP spin-waits on shared cores


@dataclass
class Eval:
    """evaluation"""
    eval_every: int = 500  # steps between validation passes
    log_every: int = 50  # steps between train/* scalars
    solved_acc: float = 0.999  # validation accuracy that counts as solved
    stop_when_solved: int = 0  # end the run once val/acc >= --solved-acc at this many validations in a row (0: never)


@dataclass
class LSTMConfig:
    """Train the from-scratch LSTM (or the vanilla RNN) on palindromes."""
    config: str = ""  # a YAML or JSON file of flag values (flag names as keys), read before the flags given
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    eval: Eval = field(default_factory=Eval)
    log: Log = field(default_factory=Log)
    run: Run = field(default_factory=Run)

    def validate(self) -> None:
        check_choices(self)
        self.run.validate()
        require_at_least(self.data.seq_length, 2, "seq_length")
        require_positive(self.optim.lr, "lr")
        for name, value in (("steps", self.optim.steps), ("batch_size", self.optim.batch_size),
                            ("hidden_dim", self.model.hidden_dim), ("eval_every", self.eval.eval_every),
                            ("log_every", self.eval.log_every), ("val_size", self.data.val_size)):
            require_at_least(value, 1, name)
        require_non_negative(self.optim.clip_norm, "clip_norm")
        require_at_least(self.optim.num_threads, 0, "num_threads")
        require_at_least(self.eval.stop_when_solved, 0, "stop_when_solved")
        if not 0 < self.eval.solved_acc <= 1:
            raise UsageError(f"--solved-acc must lie in (0, 1], got {self.eval.solved_acc}")
        d = self.data
        if d.curriculum_start and not 2 <= d.curriculum_start <= d.seq_length:
            raise UsageError(f"--curriculum-start must lie in [2, --seq-length {d.seq_length}] (0: T/8), "
                             f"got {d.curriculum_start}")
        if not (math.isfinite(d.curriculum_growth) and d.curriculum_growth > 1):
            raise UsageError(f"--curriculum-growth must be a number > 1, got {d.curriculum_growth}")
        if not 0 < d.curriculum_acc <= 1:
            raise UsageError(f"--curriculum-acc must lie in (0, 1], got {d.curriculum_acc}")
        if not math.isfinite(self.model.forget_bias):
            raise UsageError(f"--forget-bias must be finite, got {self.model.forget_bias}")

    @property
    def input_dim(self) -> int:
        return NUM_CLASSES if self.data.input_encoding == "onehot" else 1

    @property
    def name(self) -> str:
        return self.run.run_name or f"{self.model.model}-T{self.data.seq_length}-h{self.model.hidden_dim}-s{self.run.seed}"

    @property
    def run_dir(self) -> Path:
        return self.run.folder(self.name)


# --- data ------------------------------------------------------------------------------------

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


def train_batch(cfg: LSTMConfig, rank: int, step: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` on ``rank``, palindromes of ``length`` (default T): a pure function of
    (seed, rank, step, length)."""
    digits = palindromes(cfg.optim.batch_size, length or cfg.data.seq_length, generator_for(cfg.run.seed, rank, step))
    return encode(digits, cfg.data.input_encoding)


def curriculum_lengths(cfg: LSTMConfig) -> list[int]:
    """The curriculum's training lengths: --curriculum-start (0: T/8, at least 2), multiplied by
    --curriculum-growth at each advance, capped at T. Without --curriculum, T alone."""
    d = cfg.data
    if not d.curriculum:
        return [d.seq_length]
    lengths = [min(d.seq_length, d.curriculum_start or max(2, d.seq_length // 8))]
    while lengths[-1] < d.seq_length:
        lengths.append(min(d.seq_length, math.ceil(lengths[-1] * d.curriculum_growth)))
    return lengths


def curriculum_length(cfg: LSTMConfig, history: list[dict]) -> int:
    """The training length now: the last ``curriculum/T`` the history records (a resumed run reads
    it from its checkpoint's history), else the schedule's first."""
    return next((r["curriculum/T"] for r in reversed(history) if "curriculum/T" in r), curriculum_lengths(cfg)[0])


def next_length(cfg: LSTMConfig, length: int, train_acc: float) -> int:
    """The length after a log window at ``length`` with training accuracy ``train_acc``."""
    lengths = curriculum_lengths(cfg)
    if train_acc < cfg.data.curriculum_acc or length >= lengths[-1]:
        return length
    return next(t for t in lengths if t > length)


def validation_set(cfg: LSTMConfig) -> TensorDataset:
    """Fixed for a given T and size, whatever the training seed, so runs compare."""
    digits = palindromes(cfg.data.val_size, cfg.data.seq_length, generator_for(VAL_STREAM, cfg.data.seq_length))
    return TensorDataset(*encode(digits, cfg.data.input_encoding))


# --- model and evaluation --------------------------------------------------------------------

def build_model(cfg: LSTMConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    if m.model == "lstm":
        return LSTM(cfg.input_dim, m.hidden_dim, NUM_CLASSES, backend=m.backend, forget_bias=m.forget_bias)
    return RNN(cfg.input_dim, m.hidden_dim, NUM_CLASSES, backend=m.backend, init=m.rnn_init)


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
    for row in (r for r in history if "val/acc" in r):
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
    record = validation_record(history, cfg.eval.solved_acc)
    return {k: record[k] for k in SUMMARY_KEYS if k in record}


# --- the loop --------------------------------------------------------------------------------

def train(cfg: LSTMConfig, on_eval: Callable[[int, dict, Path | None], str | None] | None = None) -> dict:
    """Train under an Accelerator; return the final metrics. ``on_eval(step, metrics, ckpt)``
    is called after every validation pass (Ray Tune reports through it); a string it returns
    ends the run there, recorded as the reason (``stop_reason``: completed, solved, interrupted,
    failed, or that string). The best validation's checkpoint is kept in checkpoints/best/."""
    cfg.validate()
    with hold_run_dir(cfg.run_dir, cfg.run.resume):   # one writer per run folder
        resume_from = resume_point(cfg.run_dir / "checkpoints", cfg.run.resume)
        if resume_from is not None:   # on another number of processes: the same global batch
            batch, note = elastic_batch(resume_from, read_meta(resume_from), cfg.optim.batch_size, launched_processes())
            cfg = override(cfg, batch_size=batch)
            if note and int(os.environ.get("RANK", "0")) == 0:
                print(f"{cfg.name}: {note}{restart_note()}", flush=True)
        if cfg.optim.num_threads:
            torch.set_num_threads(cfg.optim.num_threads)
        with full_disk_is_one_line(cfg.run_dir / "checkpoints"), \
                collective_failures(launched_processes(), cfg.run.dist_timeout, cfg.run_dir / "checkpoints"):
            return _train(cfg, resume_from, on_eval)


def _train(cfg: LSTMConfig, resume_from: Path | None, on_eval) -> dict:
    run_dir, ckpt_dir, best_dir = cfg.run_dir, cfg.run_dir / "checkpoints", cfg.run_dir / "checkpoints" / BEST
    accelerator = make_accelerator(cfg.optim.mixed_precision, cfg.log.wandb, run_dir, dist_timeout=cfg.run.dist_timeout)
    rank, config = accelerator.process_index, flatten(cfg)
    config["mixed_precision"] = accelerator.mixed_precision   # what ran: the flag, or accelerate launch's
    model = build_model(cfg)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.optim.lr)
    val_loader = DataLoader(validation_set(cfg), batch_size=1000, shuffle=False)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)

    start, history, wall_before, resumed = 0, [], 0.0, {}
    if resume_from is not None:
        meta = load_checkpoint(accelerator, resume_from)
        start, history, wall_before = meta["step"], meta["extra"].get("history", []), meta["extra"].get("wall_time", 0.0)
        resumed = {"resumed_from_processes": meta.get("processes", 1),   # for debug.json: the weights as loaded
                   "loaded": debug.fingerprint(*accelerator.unwrap_model(model).state_dict().values()) if debug.enabled() else 0}
        accelerator.print(f"resuming {run_dir.name} from step {start} ({resume_from.name}){restart_note()}")
        if accelerator.is_main_process:   # a best checkpoint from after the resumed step belongs to a lost future
            for stale in list_checkpoints(best_dir):
                if int(stale.name[len(PREFIX):]) > start:
                    shutil.rmtree(stale, ignore_errors=True)

    tracker = start_tracker(accelerator, cfg.log.wandb_project, cfg.name, config, run_dir, cfg.log.wandb_group or None,
                            job_type=cfg.log.wandb_job_type,
                            tags=[cfg.model.model, f"T{cfg.data.seq_length}", cfg.data.input_encoding,
                                  *(["curriculum"] if cfg.data.curriculum else [])],
                            resumed_from=start)   # one wandb run across restarts (its id kept in the run folder)
    length = curriculum_length(cfg, history)   # the training length; T without --curriculum
    if cfg.data.curriculum and not any("curriculum/T" in r for r in history):
        history.append({"step": start, "curriculum/T": length})
        tracker.log({"curriculum/T": length}, step=start)
    stop, t0 = StopFlag(), time.perf_counter()
    wall = lambda: wall_before + time.perf_counter() - t0  # noqa: E731
    bar = tqdm(total=cfg.optim.steps, initial=start, desc=cfg.name, dynamic_ncols=True,
               disable=not (cfg.run.progress and accelerator.is_local_main_process))
    window_loss, window_hits, window_n = 0.0, 0.0, 0
    last_train, last_val, step, reason = {}, {}, start, None   # reason: why the loop ended early
    for row in history:   # a resumed run goes on (or ends at once) with the scalars it had logged last
        if "curriculum/T" not in row:
            (last_val if "val/acc" in row else last_train).update({k: v for k, v in row.items() if k != "step"})

    def checkpoint(folder: Path, at: int, keep: int) -> Path:
        return save_checkpoint(accelerator, folder, at, config, keep, extra={"history": history, "wall_time": wall()})

    model.train()
    try:
        for step in range(start + 1, cfg.optim.steps + 1):
            x, y = (t.to(accelerator.device) for t in train_batch(cfg, rank, step, length))
            logits = model(x).float()                       # (B, 10)
            loss = F.cross_entropy(logits, y)               # eqs 8-9: softmax + NLL on the last step
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.optim.clip_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
            optimizer.step()

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise UsageError(f"the loss became {loss_value} at step {step}; lower --lr or --clip-norm "
                                 "(checkpoints already written are kept)")
            window_loss, window_n = window_loss + loss_value, window_n + 1
            window_hits += (logits.argmax(1) == y).float().mean().item()
            bar.update(1)
            if step % cfg.eval.log_every == 0 or step == cfg.optim.steps:
                window = torch.tensor([window_loss / window_n, window_hits / window_n], device=accelerator.device)
                loss_mean, acc_mean = accelerator.reduce(window, reduction="mean").tolist()   # over ranks
                last_train = {"train/loss": loss_mean, "train/acc": acc_mean}
                window_loss, window_hits, window_n = 0.0, 0.0, 0
                history.append({"step": step, **last_train})
                tracker.log(last_train, step=step)
                if next_length(cfg, length, acc_mean) != length:   # every rank: the mean is the same on all
                    length = next_length(cfg, length, acc_mean)
                    history.append({"step": step, "curriculum/T": length})
                    tracker.log({"curriculum/T": length}, step=step)
                    accelerator.print(f"curriculum: training on T={length} from step {step + 1}")
                bar.set_postfix(loss=f"{last_train['train/loss']:.3f}", acc=f"{last_train['train/acc']:.3f}")

            stopping = stop.should_stop(accelerator)
            evaluating = step % cfg.eval.eval_every == 0 or step == cfg.optim.steps
            if evaluating:
                last_val = evaluate(model, val_loader, accelerator)
                history.append({"step": step, **last_val})
                tracker.log(last_val, step=step)
                record = validation_record(history, cfg.eval.solved_acc)
                if record["best_step"] == step:   # every rank: the accuracy is gathered, so all agree
                    best_ckpt = checkpoint(best_dir, step, keep=1)   # its export: a wandb model artifact (rank 0)
                    # config.json + model.safetensors now; the graphs and the card of the best at the end
                    tracker.log_model(lambda folder: export_checkpoint(best_ckpt, folder, graphs=False),
                                      metadata={"step": step, **last_val})
                if cfg.eval.stop_when_solved and record["solved_streak"] >= cfg.eval.stop_when_solved:
                    reason = "solved"
            ckpt = None
            if step % cfg.run.checkpoint_every == 0 or step == cfg.optim.steps or stopping or reason:
                ckpt = checkpoint(ckpt_dir, step, cfg.run.keep_checkpoints)
            if evaluating and on_eval is not None:
                reason = on_eval(step, {**last_train, **last_val, "step": step}, ckpt) or reason
            if stopping:
                accelerator.print(f"stop requested: checkpoint at step {step} written; rerun with --resume")
                break
            if reason:
                break
    except Exception as err:   # a finished record of the failed run too: metrics.json and the summary
        bar.close()
        stop.restore()
        failed = {**last_train, **last_val, **end_record(history, cfg), "stop_reason": "failed",
                  "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300],
                  "steps": step, "wall_time_s": round(wall(), 2), "processes": accelerator.num_processes,
                  "finished": False, "config": config}
        if accelerator.is_main_process:
            with contextlib.suppress(OSError):   # on a full disk the record cannot be written either
                write_json_atomic(run_dir / "metrics.json", failed)
        tracker.summary({k: failed[k] for k in SUMMARY_KEYS + ("error",) if failed.get(k) is not None})
        if accelerator.num_processes == 1:   # with several, the process exit ends the run (no collective here)
            tracker.finish()
        raise
    bar.close()
    stop.restore()

    # --- evaluate and save: metrics.json, the figures, the run's summary --------------------------
    unwrapped = accelerator.unwrap_model(model)
    reason = reason or ("completed" if step == cfg.optim.steps else "interrupted")
    best = list_checkpoints(best_dir)
    metrics = {**last_train, **last_val, **end_record(history, cfg), "stop_reason": reason, "steps": step,
               "wall_time_s": round(wall(), 2), "processes": accelerator.num_processes,
               **({"resumed_from_processes": resumed["resumed_from_processes"]} if resumed else {}),
               "finished": reason != "interrupted", "config": config,
               "best_checkpoint": str(best[-1]) if best else None,
               **({"curriculum": [{"step": r["step"], "T": r["curriculum/T"]} for r in history if "curriculum/T" in r]}
                  if cfg.data.curriculum else {})}
    debug.record(accelerator, run_dir, weights=debug.fingerprint(*unwrapped.parameters()),
                 first_batch=debug.fingerprint(*train_batch(cfg, rank, 1, curriculum_lengths(cfg)[0])),
                 loaded_weights=resumed.get("loaded", 0))
    if accelerator.is_main_process:
        x, y = validation_set(cfg)[0:1]   # the palindrome the gate plot reads
        figures = {"figures/curves": plot_curves(history, run_dir / "figures" / "curves.png"),
                   "figures/gates": plot_gates(unwrapped, x, y, run_dir / "figures" / "gates.png")}
        if cfg.model.model == "lstm":   # which units hold the first digit, over 100 validation palindromes
            figures["figures/memory"] = plot_memory(unwrapped, validation_set(cfg)[:100][0],
                                                    run_dir / "figures" / "memory.png")
        write_json_atomic(run_dir / "metrics.json", metrics)
        tracker.log_images(figures, step=step)
        tracker.log_lines("gates/mean", *state_means(unwrapped, x), step=step, xname="t",
                          title="mean over units per time step, on the gate plot's palindrome")
    if best:   # the run's model: the best checkpoint, every format (a wandb model artifact, rank 0)
        best_meta = read_meta(best[-1])
        tracker.log_model(lambda folder: export_checkpoint(best[-1], folder),
                          metadata={"step": best_meta["step"],
                                    **(validation_at(best_meta.get("extra", {}).get("history", []), best_meta["step"]) or {})})
    tracker.summary({k: metrics[k] for k in SUMMARY_KEYS + ("steps", "wall_time_s") if metrics.get(k) is not None})
    accelerator.print(f"{cfg.name}: val/acc {metrics.get('val/acc', float('nan')):.4f}  "
                      f"val/loss {metrics.get('val/loss', float('nan')):.4f}  steps {step}  "
                      f"wall {metrics['wall_time_s']:.1f}s  ({reason})  -> {run_dir}")
    accelerator.wait_for_everyone()
    tracker.finish()  # last: Accelerate's end_training also tears down the process group
    return metrics


def main(argv=None) -> dict | Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:   # python trainers/lstm.py export --checkpoint RUN [--out FOLDER]
        return export_main(argv[1:])
    cfg = parse(LSTMConfig, argv, prog="trainers/lstm.py", description=__doc__.splitlines()[0])
    return train(cfg)


if __name__ == "__main__":
    run_cli(main)
