"""The LSTM trainer's figures: accuracy and loss curves (with the curriculum's advances), the gates
reading one palindrome, and the memory figure: which units carry the first digit, and how."""
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
    advances = [r for r in history if "curriculum/T" in r][1:]   # the first row is the start
    for ax in (ax_acc, ax_loss):
        for k, r in enumerate(advances):
            ax.axvline(r["step"], color="grey", ls=":", lw=1, label="curriculum: training T" if k == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend()
    for r in advances:
        ax_acc.text(r["step"], 0.5, f" T={r['curriculum/T']}", rotation=90, fontsize=8, color="grey", va="bottom")
    if advances or any("curriculum/T" in r for r in history):
        first = next(r for r in history if "curriculum/T" in r)
        ax_acc.set_title(f"accuracy (training T from {first['curriculum/T']}; validation at the target T)")
    return save_figure(fig, path)


def step_axis(ax, digits: list[int], ticks: list[str] | None) -> None:
    """Time steps on the x axis: a tick per step with its digit while they fit, numbered steps past that."""
    if ticks is not None:
        ax.set(xticks=list(range(len(digits))), xticklabels=ticks)
    else:
        ax.set(xlabel="time step t")


@torch.no_grad()
def plot_gates(model, x: torch.Tensor, y: torch.Tensor, path: Path) -> Path:
    """For one palindrome ``x`` ``(1, T-1, D)`` with target ``y`` ``(1,)``: mean i, f, o per step,
    then c and h (means and heatmaps)."""
    logits, states = model(x.to(next(model.parameters()).device), return_states=True)
    digits = (x[0].argmax(-1) if x.shape[-1] > 1 else x[0, :, 0]).long().tolist()   # one-hot or scalar digits
    # "t=step" over each digit while they fit; past 10 steps the digits alone (the title gives the
    # order); past 40, numbered steps and lines without markers
    ticks = ([f"t={t}\n{d}" for t, d in enumerate(digits)] if len(digits) <= 10
             else [str(d) for d in digits] if len(digits) <= 40 else None)
    marker = "o-" if ticks is not None else "-"
    steps = range(len(digits))
    s = {k: v[0].float().cpu() for k, v in states.items()}   # each (L, H)
    shown = "".join(map(str, digits)) if len(digits) <= 40 else f"{''.join(map(str, digits[:8]))}...({len(digits)} digits)"
    title = f"{type(model).__name__} on {shown}? -> predicts {logits.argmax(1).item()} (target {y.item()})"
    if "i" not in s:  # the RNN has no gates: show its hidden state only
        fig, ax = plt.subplots(figsize=(7, 4))
        im = ax.imshow(s["h"].T, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(ylabel="hidden unit", title=title)
        step_axis(ax, digits, ticks)
        fig.colorbar(im, ax=ax, label="h")
        return save_figure(fig, path)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, name) in zip(axes[0], (("i", "input gate i"), ("f", "forget gate f"), ("o", "output gate o"))):
        mean, std = s[key].mean(1), s[key].std(1)
        ax.plot(steps, mean, marker)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.set(title=f"{name}: mean over units (+/- std)", ylim=(0, 1))
        step_axis(ax, digits, ticks)
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    ax.plot(steps, s["c"].mean(1), marker, label="c (cell)")
    ax.plot(steps, s["h"].mean(1), marker.replace("o", "s"), label="h (hidden)")
    ax.plot(steps, s["c"].abs().mean(1), "--", label="|c|")
    ax.set(title="cell and hidden state: mean over units")
    step_axis(ax, digits, ticks)
    ax.legend()
    ax.grid(alpha=0.3)
    for ax, key in zip(axes[1, 1:], ("c", "h")):
        lim = float(s[key].abs().max()) or 1.0
        im = ax.imshow(s[key].T, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set(title=f"{key} per hidden unit", ylabel="unit")
        step_axis(ax, digits, ticks)
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


def first_digits(x: torch.Tensor) -> torch.Tensor:
    """The first digit of each input ``(B, L, D)``, one-hot or scalar: ``(B,)``."""
    return (x[:, 0].argmax(-1) if x.shape[-1] > 1 else x[:, 0, 0]).long()


def eta_squared(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """One-way ANOVA effect size per column of ``values`` ``(B, H)``, grouped by ``groups`` ``(B,)``:
    between-group sum of squares over the total (1: the group alone sets the value, 0: it says nothing)."""
    values = values.double()
    total = ((values - values.mean(0)) ** 2).sum(0)
    between = sum((groups == g).sum() * (values[groups == g].mean(0) - values.mean(0)) ** 2 for g in groups.unique())
    return between / total.clamp_min(1e-12)


@torch.no_grad()
def memory_units(model, x: torch.Tensor, threshold: float = 0.5, states: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The units whose cell state carries the first digit: eta-squared of c over the first digit of
    each sequence in ``x`` ``(B, L, D)``, for every unit ``(H,)``, and the units at or above
    ``threshold``, strongest first (at least the strongest one). c is read halfway through the
    sequence, where only memory ties it to the first digit (at the last step every unit also
    reflects the answer it is about to give, which equals the first digit)."""
    if states is None:
        _, states = model(x.to(next(model.parameters()).device), return_states=True)
    eta = eta_squared(states["c"][:, x.shape[1] // 2].float().cpu(), first_digits(x).cpu())
    order = eta.argsort(descending=True)
    return order[: max(1, int((eta >= threshold).sum()))], eta


@torch.no_grad()
def plot_memory(model, x: torch.Tensor, path: Path, threshold: float = 0.5) -> Path:
    """How the LSTM holds the first digit across a batch of palindromes ``x`` ``(B, L, D)``: the forget
    gate's mean per step for all units and for the units that carry the digit (``memory_units``);
    |c| of those units per step; c of the strongest one per step, a line per sequence coloured by
    its first digit."""
    _, states = model(x.to(next(model.parameters()).device), return_states=True)
    units, eta = memory_units(model, x, threshold, states)
    f, c = states["f"].float().cpu(), states["c"].float().cpu()   # (B, L, H)
    digits, steps = first_digits(x).cpu(), range(x.shape[1])
    fig, (ax_f, ax_c, ax_top) = plt.subplots(1, 3, figsize=(16, 4.6))
    ax_f.plot(steps, f.mean((0, 2)), label=f"all {f.shape[2]} units")
    ax_f.plot(steps, f[:, :, units].mean((0, 2)), label=f"the {len(units)} carrying units")
    ax_f.set(title="forget gate f: mean per step", xlabel="time step t", ylabel="f")
    ax_f.legend()
    for u in units[:8]:
        ax_c.plot(steps, c[:, :, u].abs().mean(0), lw=1, label=f"unit {u.item()} (eta2 {eta[u]:.2f})")
    ax_c.set(title="|c| of the carrying units (mean over sequences)", xlabel="time step t", ylabel="|c|")
    ax_c.legend(fontsize=7)
    top, cmap = units[0].item(), plt.get_cmap("tab10")
    for b in range(min(len(x), 100)):
        ax_top.plot(steps, c[b, :, top], color=cmap(digits[b].item()), lw=0.6, alpha=0.7)
    for d in digits.unique().tolist():
        ax_top.plot([], [], color=cmap(d), label=str(d))
    ax_top.set(title=f"c of unit {top} (eta2 {eta[top]:.2f}), coloured by the first digit",
               xlabel="time step t", ylabel="c")
    ax_top.legend(title="first digit", fontsize=7, ncol=2)
    for ax in (ax_f, ax_c, ax_top):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{type(model).__name__}: how the first digit is held over T={x.shape[1] + 1} "
                 f"({len(x)} validation palindromes; carrying units: eta2 of c over the first digit "
                 f">= {threshold:g} halfway)")
    return save_figure(fig, path)
