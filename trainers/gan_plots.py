"""The GAN trainer's figures: the stage grids side by side, and the loss curves."""
from __future__ import annotations

from pathlib import Path

from trainers.figures import plt, save_figure, smooth


def plot_stages(paths: list[tuple[str, Path]], path: Path, title: str) -> Path:
    """The grids side by side, titled (used for the evolution and the start/middle/end figures)."""
    import matplotlib.image as mpimg
    fig, axes = plt.subplots(1, len(paths), figsize=(2.6 * len(paths), 3.0), squeeze=False)
    for ax, (label, png) in zip(axes[0], paths):
        ax.imshow(mpimg.imread(png), cmap="gray")
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_losses(history: dict[str, list[float]], iters_per_epoch: int, path: Path) -> Path:
    """Per-iteration D and G loss, D(x) and D(G(z)): raw (faint) and smoothed."""
    steps = list(range(1, len(history["loss_d"]) + 1))
    window = max(1, min(100, len(steps) // 20))
    fig, (ax_loss, ax_prob) = plt.subplots(1, 2, figsize=(12, 4))
    for ax, keys in ((ax_loss, (("loss_d", "D loss"), ("loss_g", "G loss (non-saturating)"))),
                     (ax_prob, (("d_x", "D(x)"), ("d_g_z", "D(G(z)) before the D step")))):
        for key, label in keys:
            line, = ax.plot(steps, smooth(history[key], window), label=f"{label}, mean of {window}")
            ax.plot(steps, history[key], color=line.get_color(), alpha=0.15, lw=0.5)
        ax.set(xlabel=f"iteration ({iters_per_epoch} per epoch)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set(title="losses", ylabel="BCE")
    ax_prob.set(title="discriminator outputs", ylabel="mean probability of 'real'", ylim=(0, 1))
    return save_figure(fig, path)


def plot_run(run_dir: Path, history: dict, iters_per_epoch: int, stages: list[int], final: Path,
             step: int) -> dict[str, Path]:
    """The end-of-run figures: losses, the stage grids side by side, and start/middle/end."""
    figures = {"figures/losses": plot_losses(history, iters_per_epoch, run_dir / "figures" / "losses.png")}
    done = [(f"epoch {e}", run_dir / "samples" / f"epoch_{e:03d}.png") for e in stages]
    done = [(label, png) for label, png in done if png.exists()]
    if done:
        figures["figures/stages"] = plot_stages(done, run_dir / "figures" / "stages.png",
                                                "the fixed-noise grid across training")
        middle = done[len(done) // 2] if len(done) > 2 else done[-1]
        panels = [("start: " + done[0][0], done[0][1]), ("middle: " + middle[0], middle[1]),
                  (f"end: iteration {step}", final)]
        figures["figures/three_panel"] = plot_stages(panels, run_dir / "figures" / "three_panel.png",
                                                     "start, middle and end of training")
    return figures
