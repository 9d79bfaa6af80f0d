"""Latent walks between digits: the endpoints the classifier is surest of, linear and SLERP paths
between them, and their figures.

    python trainers/gan.py interpolate --checkpoint runs/<run> --pairs 8-3,1-7,0-6,4-9 --steps 9 --mode both

Each endpoint is the latent, of ENDPOINT_DRAWS seeded draws, whose image the classifier gives the
wanted digit with the highest probability. Each frame of a walk is labelled with the classifier's
digit and confidence. With several processes each rank searches its share of the draws; rank 0
alone walks and draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from trainers.cli import UsageError
from trainers.figures import plt, save_figure
from trainers.gan_metrics import BATCH, Scorer
from trainers.gan_sampling import noise, unwrap
from trainers.runtime import SINGLE, Shards

ENDPOINT_STREAM = 4_242     # seed key of the latents searched for interpolation endpoints
ENDPOINT_DRAWS = 4_096      # latents searched for each interpolation endpoint
DEFAULT_PAIRS = "8-3,1-7,0-6,4-9"   # the report's walks
WALK_STEPS = 9              # frames per walk at the end of training


# --- latents and their images ----------------------------------------------------------------

def latent_dim_of(generator: nn.Module) -> int:
    """``generator.latent_dim`` if set, else the input width of its first layer."""
    g = unwrap(generator)
    if isinstance(getattr(g, "latent_dim", None), int):
        return g.latent_dim
    for m in g.modules():
        if isinstance(m, nn.ConvTranspose2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("cannot tell the generator's latent size")


@torch.no_grad()
def decode(generator: nn.Module, z: Tensor) -> Tensor:
    """Images ``(N, 1, 28, 28)`` on the CPU for latents ``z`` ``(N, d)``, in eval mode, batched."""
    g = unwrap(generator)
    was_training = g.training
    g.eval()
    device = next(g.parameters()).device
    try:
        out = [g(z[i:i + BATCH].to(device)[:, :, None, None]).float().cpu() for i in range(0, len(z), BATCH)]
    finally:
        g.train(was_training)
    return torch.cat(out)


# --- latent walks ---------------------------------------------------------------------------

def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"8-3,1-7"`` -> ``[(8, 3), (1, 7)]``; anything else is a UsageError."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or not all(len(p) == 1 and p.isdigit() for p in parts):
            raise UsageError(f"--pairs: {item.strip()!r} is not two digits joined by '-' (e.g. 8-3,1-7)")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def lerp(z1: Tensor, z2: Tensor, t: Tensor) -> Tensor:
    """``(d,)``, ``(d,)``, ``(T,)`` -> ``(T, d)``: z1 + t (z2 - z1)."""
    t = t[:, None].to(z1.dtype)
    return (1 - t) * z1 + t * z2


def slerp(z1: Tensor, z2: Tensor, t: Tensor, eps: float = 1e-6) -> Tensor:
    """Spherical interpolation ``(T, d)``: the direction turns at constant angular speed along the
    great circle from z1 to z2, and the norm goes linearly from |z1| to |z2|:

        u(t) = sin((1-t) w) / sin w * u1 + sin(t w) / sin w * u2,   u_i = z_i / |z_i|, w = angle(u1, u2)
        z(t) = ((1-t) |z1| + t |z2|) u(t)

    (with |z1| = |z2| this is the usual formula applied to z1 and z2). For (anti-)parallel
    vectors sin w = 0 and the great circle is undefined: fall back to lerp. The angle comes from
    ``2 atan2(|u1 - u2|, |u1 + u2|)``, accurate near 0 and near pi (``acos`` of the dot product is not).
    """
    a, b = z1.double(), z2.double()
    r1, r2 = a.norm(), b.norm()
    u1, u2 = a / r1, b / r2
    omega = 2 * torch.atan2((u1 - u2).norm(), (u1 + u2).norm())
    if not torch.isfinite(omega) or torch.sin(omega) < eps:
        return lerp(z1, z2, t)
    t = t.double()[:, None]                                                      # (T, 1)
    direction = (torch.sin((1 - t) * omega) * u1 + torch.sin(t * omega) * u2) / torch.sin(omega)   # (T, d)
    return (((1 - t) * r1 + t * r2) * direction).to(z1.dtype)


def find_endpoints(generator: nn.Module, scorer: Scorer, digits: Sequence[int], draws: int | None = None,
                   seed: int = 0, shards: Shards = SINGLE) -> dict[int, tuple[Tensor, float]]:
    """For each digit, the latent (of ``draws`` seeded ones, default ENDPOINT_DRAWS) whose image
    the classifier gives that digit with the highest probability, and that probability. Each rank
    decodes and classifies its share of the draws (a collective under ``shards``)."""
    draws = draws or ENDPOINT_DRAWS
    z = noise(draws, latent_dim_of(generator), ENDPOINT_STREAM, seed)       # (draws, d) on every rank
    part = shards.part(draws)
    _, _, probs = scorer.classify(decode(generator, z[part.start:part.stop]))
    probs = shards.gather(probs, draws)                                         # (draws, 10)
    best = {}
    for d in sorted(set(digits)):
        k = int(probs[:, d].argmax())
        best[d] = (z[k], float(probs[k, d]))
    return best


@dataclass
class Walk:
    pair: tuple[int, int]
    mode: str                 # linear or slerp
    t: list[float]
    images: Tensor            # (T, 1, 28, 28)
    predicted: list[int]
    confidence: list[float]
    latent_norm: list[float]
    end_confidence: tuple[float, float]   # p(wanted digit) of each endpoint image


def walk(generator: nn.Module, scorer: Scorer, pair: tuple[int, int], ends: dict, steps: int, mode: str) -> Walk:
    t = torch.linspace(0, 1, steps)                      # 0, 1/(steps-1), ..., 1
    z = (slerp if mode == "slerp" else lerp)(ends[pair[0]][0], ends[pair[1]][0], t)   # (T, d)
    images = decode(generator, z)
    pred, conf, _ = scorer.classify(images)
    return Walk(pair, mode, t.tolist(), images, pred.tolist(), conf.tolist(), z.norm(dim=1).tolist(),
                (ends[pair[0]][1], ends[pair[1]][1]))


def _show_frames(axes, w: Walk, label_norm: bool) -> None:
    for ax, img, p, c, t, r in zip(axes, w.images, w.predicted, w.confidence, w.t, w.latent_norm):
        ax.imshow(img[0].numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{p} ({c:.2f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"t={t:.3g}" + (f"\n|z|={r:.1f}" if label_norm else ""), fontsize=7)


def plot_strip(w: Walk, path: Path) -> Path:
    """One pair's walk: the frames, with predicted digit and confidence over each."""
    fig, axes = plt.subplots(1, len(w.t), figsize=(1.2 * len(w.t), 1.9), squeeze=False)
    _show_frames(axes[0], w, label_norm=False)
    fig.suptitle(f"{w.mode} walk {w.pair[0]} -> {w.pair[1]} (endpoints: p({w.pair[0]})={w.end_confidence[0]:.2f}, "
                 f"p({w.pair[1]})={w.end_confidence[1]:.2f}); classifier label and confidence per frame", fontsize=9)
    return save_figure(fig, path)


def plot_comparison(walks: list[Walk], path: Path) -> Path:
    """Linear over SLERP for every pair, with |z| under each frame."""
    pairs = sorted({w.pair for w in walks}, key=[w.pair for w in walks].index)
    rows = [w for p in pairs for m in ("linear", "slerp") for w in walks if w.pair == p and w.mode == m]
    T = len(rows[0].t)
    fig, axes = plt.subplots(len(rows), T, figsize=(1.2 * T, 1.75 * len(rows)), squeeze=False)
    for ax_row, w in zip(axes, rows):
        _show_frames(ax_row, w, label_norm=True)
        ax_row[0].set_ylabel(f"{w.pair[0]}->{w.pair[1]}\n{w.mode}", fontsize=9)
    fig.suptitle("linear vs SLERP latent walks (label and confidence above, |z| below each frame)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def interpolate(generator: nn.Module, scorer: Scorer, pairs: list[tuple[int, int]], steps: int, mode: str,
                out_dir: Path, draws: int | None = None, seed: int = 0,
                shards: Shards = SINGLE) -> tuple[list[Walk], dict[str, Path]]:
    """Every walk and its figures: ``interp_<mode>_<a>-<b>.png`` and, for ``both``,
    ``interp_linear_vs_slerp.png``. Returns the walks and ``{tracker key: png path}``.
    Under ``shards`` every rank searches its share of the endpoints; rank 0 alone walks and
    draws (a few dozen frames), the others return nothing."""
    ends = find_endpoints(generator, scorer, [d for p in pairs for d in p], draws, seed, shards)
    if not shards.is_main:
        return [], {}
    modes = ("linear", "slerp") if mode == "both" else (mode,)
    walks = [walk(generator, scorer, p, ends, steps, m) for p in pairs for m in modes]
    figures = {f"interp/{w.mode}_{w.pair[0]}-{w.pair[1]}":
               plot_strip(w, out_dir / f"interp_{w.mode}_{w.pair[0]}-{w.pair[1]}.png") for w in walks}
    if mode == "both":
        figures["interp/linear_vs_slerp"] = plot_comparison(walks, out_dir / "interp_linear_vs_slerp.png")
    return walks, figures


TABLE_COLUMNS = ("pair", "mode", "t", "predicted_class", "confidence", "latent_norm")


def walk_rows(walks: list[Walk]) -> list[list]:
    return [[f"{w.pair[0]}-{w.pair[1]}", w.mode, round(t, 4), p, round(c, 4), round(r, 3)]
            for w in walks for t, p, c, r in zip(w.t, w.predicted, w.confidence, w.latent_norm)]


def print_walks(walks: list[Walk]) -> None:
    for w in walks:
        frames = "  ".join(f"{p}:{c:.2f}" for p, c in zip(w.predicted, w.confidence))
        print(f"{w.mode:6s} {w.pair[0]}->{w.pair[1]}  {frames}   "
              f"(endpoints p({w.pair[0]})={w.end_confidence[0]:.2f} p({w.pair[1]})={w.end_confidence[1]:.2f})")
