"""The LSTM trainer's figures: accuracy and loss curves, and the gates reading one palindrome."""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.figures import plt, save_figure


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
def plot_gates(model, x: torch.Tensor, y: torch.Tensor, path: Path) -> Path:
    """For one palindrome ``x`` ``(1, T-1, D)`` with target ``y`` ``(1,)``: mean i, f, o per step,
    then c and h (means and heatmaps)."""
    logits, states = model(x.to(next(model.parameters()).device), return_states=True)
    digits = (x[0].argmax(-1) if x.shape[-1] > 1 else x[0, :, 0]).long().tolist()   # one-hot or scalar digits
    # "t=step" over each digit while they fit; past 10 steps the digits alone (the title gives the order)
    ticks = [f"t={t}\n{d}" for t, d in enumerate(digits)] if len(digits) <= 10 else [str(d) for d in digits]
    steps = range(len(digits))
    s = {k: v[0].float().cpu() for k, v in states.items()}   # each (L, H)
    title = (f"{type(model).__name__} on {''.join(map(str, digits))}? -> predicts "
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
def state_means(model, x: torch.Tensor) -> tuple[list[int], dict[str, list[float]]]:
    """The lines of the gate plot's top row and first panel: time steps, and per step the mean over
    units of each gate (the LSTM's i, f, o) and of c and h, on the same palindrome ``x``."""
    _, states = model(x.to(next(model.parameters()).device), return_states=True)
    names = {"i": "input gate i", "f": "forget gate f", "o": "output gate o", "c": "cell c", "h": "hidden h"}
    means = {label: states[k][0].float().mean(1).cpu().tolist() for k, label in names.items() if k in states}
    return list(range(x.shape[1])), means
