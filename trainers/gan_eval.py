"""Offline GAN evaluation with the shipped MNIST classifier, and latent walks between digits.

    python trainers/gan.py evaluate --checkpoint runs/<run>            # 10,000 samples vs the floor
    python trainers/gan.py evaluate --images samples.pt                # an N x 1 x 28 x 28 tensor in [-1, 1]
    python trainers/gan.py interpolate --checkpoint runs/<run> --pairs 8-3,1-7,0-6,4-9 --steps 9 --mode both
    python trainers/gan.py evaluate --help

Metrics, all from ``models/mnist_cnn.py`` with the committed weights (checksum checked):
- FID: the Frechet distance between Gaussians fitted to the classifier's 128-d penultimate
  features of the images and of the 10,000 MNIST test images. The classifier runs once per
  image; its features feed torchmetrics' ``FrechetInceptionDistance`` (through an identity
  feature module) and its head gives p(y|x), so nothing is computed twice.
- classifier score: exp(E_x[KL(p(y|x) || p(y))]), the Inception Score with this classifier
  (1 = useless, 10 = every image confidently one digit and the digits uniform).
- the histogram of predicted classes, its entropy (nats; uniform = ln 10 = 2.303) and its
  smallest and largest class fractions (mode collapse shows here).
Each is reported beside the same number for 10,000 real MNIST training images: the floor.

The trainer calls ``stage_metrics(generator, device)`` at each stage (2,000 samples, seconds
on a CPU) and ``end_of_training(generator, run_dir, tracker)`` once (10,000 samples plus the
interpolation figures).

With several processes every rank calls them with the job's ``Shards``: each rank generates and
classifies its own contiguous share of the samples (and of the test set, the floor and the
endpoint search), the features and class probabilities are gathered in order on every rank, and
the metrics are computed from exactly the rows one process would have made. Only rank 0 writes
files. The FID metric never synchronises by itself (``sync_on_compute=False``): its inputs are
already complete on every rank, so a rank-0-only ``compute`` cannot wait for the others.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.mnist import load_mnist, to_unit_range
from models.mnist_cnn import FEATURE_DIM, NUM_CLASSES
from trainers.checkpoint import write_json_atomic
from trainers.cli import (UsageError, arg, parse_config, require_at_least, require_writable_dir,
                          validate_field_choices)
from trainers.figures import plt, save_figure
from trainers.gan_sampling import generate, load_generator_state, unwrap
from trainers.runtime import (DIST_TIMEOUT_S, SINGLE, Shards, collective_failures, generator_for,
                              launched_processes, make_accelerator)
from trainers.tracking import NullTracker, start_tracker

STAGE_SAMPLES = 2_000       # images per stage_metrics call: ~seconds on a 2-core CPU
FULL_SAMPLES = 10_000       # images for the final numbers, as many as the floor uses
FLOOR_SAMPLES = 10_000      # real MNIST training images that give the floor
FLOOR_STREAM = 5_555        # seed key of the floor's random subset of the training set
ENDPOINT_STREAM = 4_242     # seed key of the latents searched for interpolation endpoints
ENDPOINT_DRAWS = 4_096      # latents searched for each interpolation endpoint
BATCH = 500                 # images per generator / classifier call
DEFAULT_PAIRS = "8-3,1-7,0-6,4-9"   # the report's walks
MODES = ("linear", "slerp", "both")
GOAL = {"fid_over_floor": 5.0, "classifier_score": 8.8, "class_frac": (0.05, 0.15)}  # the bar a run must clear


# --- the scorer: classifier + FID statistics of the MNIST test set ---------------------------

class FeatureInput(nn.Module):
    """FID's feature module: the classifier's penultimate features are computed once outside and
    passed in, so this is the identity; ``num_features`` sizes torchmetrics' statistics."""

    num_features = FEATURE_DIM

    def forward(self, features: Tensor) -> Tensor:
        return features


class Scorer:
    """The shipped classifier and the FID statistics of the 10,000 MNIST test images.

    ``shards`` splits the featurisation of the test set across the job's processes (a collective);
    the statistics that result are the same on every rank and the same as with one process."""

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None,
                 shards: Shards = SINGLE):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise UsageError("the GAN metrics need torchmetrics (`pip install torchmetrics`); "
                             "or train with --no-eval-metrics") from None
        from trainers.classifier import load_classifier

        self.device = torch.device(device)
        self.images_scored = 0          # images this process put through the classifier
        self.classifier = load_classifier(weights, self.device)
        self.fid = FrechetInceptionDistance(feature=FeatureInput(), reset_real_features=False,
                                            sync_on_compute=False)
        test_images, _ = load_mnist("test")
        part = shards.part(len(test_images))
        test_features, _ = self.features_and_log_probs(to_unit_range(test_images[part.start:part.stop]))
        self.fid.update(shards.gather(test_features, len(test_images)), real=True)
        self._floor_cache: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def features_and_log_probs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, 1, 28, 28)`` in [-1, 1] -> features ``(N, 128)`` (float64, CPU) and log p(y|x) ``(N, 10)``."""
        feats, logps = [torch.empty(0, FEATURE_DIM, dtype=torch.float64)], [torch.empty(0, NUM_CLASSES)]
        self.images_scored += len(images)
        for i in range(0, len(images), BATCH):
            f = self.classifier.features(images[i:i + BATCH].to(self.device).float())   # (b, 128)
            feats.append(f.double().cpu())
            logps.append(F.log_softmax(self.classifier.head(f).float(), dim=1).cpu())  # (b, 10)
        return torch.cat(feats), torch.cat(logps)

    def metrics(self, features: Tensor, log_probs: Tensor) -> dict:
        """FID against the test set, classifier score and class histogram of one image set."""
        self.fid.reset()                                  # keeps the real (test-set) statistics
        self.fid.update(features, real=False)
        hist = class_histogram(log_probs.argmax(1))
        return {"n": len(features), "fid": float(self.fid.compute()),
                "classifier_score": classifier_score(log_probs), "class_entropy": histogram_entropy(hist),
                "min_class_frac": float(hist.min()), "max_class_frac": float(hist.max()),
                "class_hist": [round(float(h), 4) for h in hist]}

    def score_images(self, images: Tensor, shards: Shards = SINGLE) -> dict:
        """Metrics of ``images`` (every rank holds them all; each classifies its share)."""
        n = len(images)
        part = shards.part(n)
        return self.score_part(images[part.start:part.stop], n, shards)

    def score_part(self, images: Tensor, n: int, shards: Shards = SINGLE) -> dict:
        """Metrics of ``n`` images of which this rank holds ``images``, its ``shards.part(n)``."""
        features, log_probs = self.features_and_log_probs(images)
        return self.metrics(shards.gather(features, n), shards.gather(log_probs, n))

    def floor(self, n: int = FLOOR_SAMPLES, shards: Shards = SINGLE) -> dict:
        """The same metrics for ``n`` real MNIST training images (a fixed random subset)."""
        if self._floor_cache is None:
            train_images, _ = load_mnist("train")
            pick = torch.randperm(len(train_images), generator=generator_for(FLOOR_STREAM))[:FLOOR_SAMPLES]
            part = shards.part(FLOOR_SAMPLES)
            features, log_probs = self.features_and_log_probs(to_unit_range(train_images[pick[part.start:part.stop]]))
            self._floor_cache = shards.gather(features, FLOOR_SAMPLES), shards.gather(log_probs, FLOOR_SAMPLES)
        features, log_probs = self._floor_cache
        return self.metrics(features[:n], log_probs[:n])

    @torch.no_grad()
    def classify(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Predicted class, its confidence and the full p(y|x) ``(N, 10)``."""
        _, log_probs = self.features_and_log_probs(images)
        probs = log_probs.exp()
        conf, pred = probs.max(1)
        return pred, conf, probs


_SCORERS: dict[str, Scorer] = {}


def images_scored() -> int:
    """Images this process has put through the classifier, over all its scorers."""
    return sum(s.images_scored for s in _SCORERS.values())


def scorer_for(device: str = "cpu", shards: Shards = SINGLE) -> Scorer:
    """One Scorer per device and process: the test-set statistics are computed once (shared out
    across ``shards``; every rank calls this at the same point, so a cached scorer is cached on all)."""
    d = torch.device(device)
    key = "cpu" if d.type == "cpu" else str(d)   # "cpu:0" and "cpu" are one device
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(key, shards=shards)
    return _SCORERS[key]


def classifier_score(log_probs: Tensor) -> float:
    """exp(E_x[KL(p(y|x) || p(y))]) with p(y) = E_x[p(y|x)]; ``log_probs`` is ``(N, 10)``."""
    log_probs = log_probs.double()
    log_marginal = torch.logsumexp(log_probs, dim=0) - math.log(len(log_probs))       # (10,)
    kl = (log_probs.exp() * (log_probs - log_marginal)).sum(dim=1)                      # (N,)
    return float(kl.mean().exp())


def class_histogram(predictions: Tensor) -> Tensor:
    """Fraction of the images predicted as each digit, ``(10,)``."""
    return torch.bincount(predictions, minlength=NUM_CLASSES).double() / len(predictions)


def histogram_entropy(fractions: Tensor) -> float:
    """Entropy in nats of a class histogram (0 for a single class, ln 10 for uniform)."""
    p = fractions[fractions > 0]
    return float(-(p * p.log()).sum()) + 0.0   # + 0.0: no "-0.000" for a single class


def goal_check(generated: dict, floor: dict) -> dict:
    """The bar for the default CPU run, each part with the number it was judged on."""
    low, high = GOAL["class_frac"]
    ratio = generated["fid"] / floor["fid"]
    return {"fid_over_floor": round(ratio, 2), "fid_ok": ratio <= GOAL["fid_over_floor"],
            "score_ok": generated["classifier_score"] >= GOAL["classifier_score"],
            "classes_ok": low <= generated["min_class_frac"] and generated["max_class_frac"] <= high}


# --- the generator side ---------------------------------------------------------------------

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


def latents(n: int, dim: int, *keys: int) -> Tensor:
    """``(n, dim)`` standard normal latents, a pure function of ``keys``."""
    return torch.randn(n, dim, generator=generator_for(*keys))


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


def sample(generator: nn.Module, n: int, seed: int = 0, part: range | None = None) -> Tensor:
    """The same ``n`` images as ``trainers/gan.py sample --n n --seed seed`` writes (only the
    rows in ``part`` if given)."""
    return generate(unwrap(generator), n, seed, part=part)


def score_generator(generator: nn.Module, scorer: Scorer, n: int, seed: int = 0,
                    shards: Shards = SINGLE) -> dict:
    """Metrics of the generator's ``n`` samples; each rank generates and classifies its share."""
    part = shards.part(n)
    return scorer.score_part(sample(generator, n, seed, part), n, shards)


def stage_metrics(generator: nn.Module, device: str | torch.device = "cpu", shards: Shards = SINGLE,
                  n: int = STAGE_SAMPLES) -> dict[str, float]:
    """Cheap metrics for one training stage, from 2,000 samples. FID is biased upwards at small n
    (the real-data floor is 4.5 at n=2,000 and 1.9 at n=10,000), so stage FIDs show the trend;
    the goal is judged on the final 10,000-sample numbers. A collective under ``shards``."""
    m = score_generator(generator, scorer_for(str(device), shards), n, shards=shards)
    return {"eval/fid": m["fid"], "eval/classifier_score": m["classifier_score"],
            "eval/class_entropy": m["class_entropy"], "eval/min_class_frac": m["min_class_frac"],
            "eval/max_class_frac": m["max_class_frac"]}


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
    z = latents(draws, latent_dim_of(generator), ENDPOINT_STREAM, seed)       # (draws, d) on every rank
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


# --- reports --------------------------------------------------------------------------------

def plot_class_histogram(generated: dict, floor: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = torch.arange(NUM_CLASSES).numpy()
    ax.bar(x - 0.2, generated["class_hist"], 0.4, label=f"generated (n={generated['n']})")
    ax.bar(x + 0.2, floor["class_hist"], 0.4, label=f"real MNIST train (n={floor['n']})")
    low, high = GOAL["class_frac"]
    ax.axhline(low, color="gray", ls="--", lw=0.8)
    ax.axhline(high, color="gray", ls="--", lw=0.8, label=f"goal band {low:.0%}-{high:.0%}")
    ax.set(xticks=x, xlabel="predicted digit", ylabel="fraction of images",
           title="class histogram by the evaluation classifier")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def format_report(generated: dict, floor: dict, labels: tuple[str, str] = ("generated", "real floor")) -> str:
    rows = [("FID vs MNIST test (classifier features)", "fid", "{:.3f}"),
            ("classifier score exp(E KL)", "classifier_score", "{:.3f}"),
            ("class-histogram entropy (nats, max 2.303)", "class_entropy", "{:.4f}"),
            ("smallest class fraction", "min_class_frac", "{:.4f}"),
            ("largest class fraction", "max_class_frac", "{:.4f}")]
    lines = [f"{'metric':44s}{labels[0]:>12s}{labels[1]:>12s}",
             f"{'images':44s}{generated['n']:>12d}{floor['n']:>12d}"]
    lines += [f"{name:44s}{fmt.format(generated[k]):>12s}{fmt.format(floor[k]):>12s}" for name, k, fmt in rows]
    for label, m in zip(labels, (generated, floor)):
        lines.append(f"class fractions 0-9 ({label}): " + " ".join(f"{h:.3f}" for h in m["class_hist"]))
    return "\n".join(lines)


def full_metrics(generator: nn.Module, scorer: Scorer, n: int | None = None, seed: int = 0,
                 shards: Shards = SINGLE) -> dict:
    generated = score_generator(generator, scorer, n or FULL_SAMPLES, seed, shards)
    floor = scorer.floor(shards=shards)
    return {"generated": generated, "real_floor": floor, "goal": goal_check(generated, floor)}


def end_of_training(generator: nn.Module, run_dir: Path, tracker, step: int | None = None,
                    pairs: str | None = None, steps: int = 9, shards: Shards = SINGLE,
                    n: int | None = None) -> dict:
    """Final metrics (``n``, default 10,000, samples beside the floor) and the interpolation
    figures under ``run_dir/figures``; images and a table go to ``tracker``. Returns
    ``flat_metrics`` for metrics.json. Every rank calls it; rank 0 alone writes and logs."""
    device = next(unwrap(generator).parameters()).device
    scorer = scorer_for(str(device), shards)
    result = full_metrics(generator, scorer, n, shards=shards)
    pairs = pairs or DEFAULT_PAIRS
    figures_dir = Path(run_dir) / "figures"
    walks, figures = interpolate(generator, scorer, parse_pairs(pairs), steps, "both", figures_dir,
                                 shards=shards)
    final = flat_metrics(result)
    if not shards.is_main:
        return final
    figures["figures/class_histogram"] = plot_class_histogram(result["generated"], result["real_floor"],
                                                              figures_dir / "class_histogram.png")
    tracker.log_images(figures, step=step)
    tracker.log_table("interp/walks", TABLE_COLUMNS, walk_rows(walks), step=step)
    log_class_histogram(tracker, result["generated"], result["real_floor"], step)
    tracker.summary(summary_metrics(final))
    print(format_report(result["generated"], result["real_floor"]))
    return final


def summary_metrics(final: dict[str, float]) -> dict[str, float]:
    """The run summary's ``final/*`` numbers: ``flat_metrics`` less the per-class fractions, which
    the class-histogram bar chart holds."""
    return {f"final/{k}": v for k, v in final.items() if not k.startswith("class_frac_")}


def log_class_histogram(tracker, generated: dict, floor: dict, step: int | None) -> None:
    """The class histogram as a native bar chart, each digit's generated fraction beside the real floor's."""
    tracker.log_bar("eval/class_histogram", range(NUM_CLASSES),
                    {"generated": generated["class_hist"], "real floor": floor["class_hist"]}, step=step,
                    title=f"class histogram: generated (n={generated['n']}) beside real MNIST (n={floor['n']})")


def flat_metrics(result: dict) -> dict[str, float]:
    """``{name: float}`` for metrics.json and the tracker: each number beside its real-data floor."""
    g, f, goal = result["generated"], result["real_floor"], result["goal"]
    out = {"n": float(g["n"]), "n_floor": float(f["n"])}
    for key in ("fid", "classifier_score", "class_entropy", "min_class_frac", "max_class_frac"):
        out[key], out[f"{key}_floor"] = g[key], f[key]
    out["fid_over_floor"] = goal["fid_over_floor"]
    for d in range(NUM_CLASSES):
        out[f"class_frac_{d}"], out[f"class_frac_{d}_floor"] = g["class_hist"][d], f["class_hist"][d]
    out.update({k: float(goal[k]) for k in ("fid_ok", "score_ok", "classes_ok")})
    return out


# --- CLIs (dispatched by trainers/gan.py) ---------------------------------------------------

@dataclass
class EvaluateConfig:
    checkpoint: str = arg("", "run folder or checkpoint to sample from (or use --images)", "input")
    images: str = arg("", ".pt file holding an N x 1 x 28 x 28 float tensor in [-1, 1] (or use --checkpoint)", "input")
    n: int = arg(FULL_SAMPLES, "images sampled from --checkpoint (the floor uses 10,000); --num-images under "
                 "torchrun or accelerate launch, whose own parsers take --n for theirs", "evaluation",
                 aliases=("--num-images",))
    seed: int = arg(0, "seed of the sampled latents", "evaluation")
    out: str = arg("", "folder for metrics.json and class_histogram.png (default: <run>/eval or "
                       "<images stem>_eval beside the file)", "output")
    wandb: bool = arg(False, "also log the numbers (run summary), the class-histogram bar chart and the figure "
                             "to wandb (offline without an API key)", "logging")
    wandb_project: str = arg("palgan", "wandb project", "logging")

    def validate(self) -> None:
        if bool(self.checkpoint) == bool(self.images):
            raise UsageError("pass exactly one of --checkpoint DIR or --images FILE.pt")
        require_at_least(self.n, 2, "n")


@dataclass
class InterpolateConfig:
    checkpoint: str = arg("", "run folder or checkpoint of the generator (required)", "input")
    pairs: str = arg(DEFAULT_PAIRS, "digit pairs to walk between, as a-b,c-d", "interpolation")
    steps: int = arg(9, "frames per walk, t = 0, 1/(steps-1), ..., 1", "interpolation")
    mode: str = arg("both", "latent path: straight line, great circle, or both", "interpolation", MODES)
    draws: int = arg(ENDPOINT_DRAWS, "latents searched for each endpoint digit", "interpolation")
    seed: int = arg(0, "seed of the searched latents", "interpolation")
    out: str = arg("", "folder for the figures (default: <run>/eval)", "output")
    wandb: bool = arg(False, "also log the figures and a table to wandb (offline without an API key)", "logging")
    wandb_project: str = arg("palgan", "wandb project", "logging")

    def validate(self) -> None:
        validate_field_choices(self)
        if not self.checkpoint:
            raise UsageError("--checkpoint DIR is required (a run folder or one of its checkpoints/step_* folders)")
        parse_pairs(self.pairs)
        require_at_least(self.steps, 2, "steps")
        require_at_least(self.draws, 1, "draws")


def run_tags(checkpoint: str) -> list[str]:
    """Tags of a run made from a checkpoint: its preset and width (none for an images file)."""
    if not checkpoint:
        return ["images"]
    from trainers.checkpoint import read_meta, resolve_checkpoint
    config = read_meta(resolve_checkpoint(Path(checkpoint))).get("config", {})
    return [str(config.get("preset", "gan")), f"b{config.get('base_channels', '?')}"]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_generator(checkpoint: str) -> tuple[nn.Module, Path]:
    """The checkpoint's generator (eval mode, on the device) and the run folder it belongs to."""
    from trainers.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(Path(checkpoint))
    generator, _ = load_generator_state(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return generator.to(_device()).eval(), run_dir


def job_processes(out: Path, use_wandb: bool = False):
    """``(accelerator or None, shards)`` for a subcommand: under ``accelerate launch`` or torchrun
    with several processes, the ranks share the work; alone, no process group is made unless
    wandb needs an Accelerator."""
    if launched_processes() == 1 and not use_wandb:
        return None, SINGLE
    accelerator = make_accelerator("no", use_wandb, out)
    return accelerator, Shards(accelerator)


def load_images(path: str) -> Tensor:
    """An ``N x 1 x 28 x 28`` finite float tensor in [-1, 1] from a .pt file, else a UsageError."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--images {p} does not exist; write one with `python trainers/gan.py sample "
                         "--checkpoint DIR --n 10000 --out FILE.pt`")
    try:
        images = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated, pickled objects
        raise UsageError(f"--images {p} is not a readable tensor file ({err.__class__.__name__})") from None
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28) \
            or len(images) < 2:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UsageError(f"--images {p} holds {shape}; expected a tensor of shape N x 1 x 28 x 28 with N >= 2")
    if not images.is_floating_point() or not torch.isfinite(images).all() or images.abs().max() > 1.0 + 1e-4:
        raise UsageError(f"--images {p} must hold finite float values in [-1, 1] (the generator's tanh range)")
    return images.float()


def evaluate_main(argv: Sequence[str] | None = None) -> dict:
    """Every rank scores its share of the images; rank 0 writes metrics.json and the histogram."""

    cfg = parse_config(EvaluateConfig, argv, description="Score generated digits with the shipped classifier "
                       "(FID, classifier score, class histogram) beside real MNIST.", prog="trainers/gan.py evaluate")
    if cfg.images:
        images = load_images(cfg.images)
        out = Path(cfg.out) if cfg.out else Path(cfg.images).with_name(Path(cfg.images).stem + "_eval")
        source, generator = str(Path(cfg.images).resolve()), None
    else:
        generator, run_dir = _load_generator(cfg.checkpoint)
        out = Path(cfg.out) if cfg.out else run_dir / "eval"
        source = str(Path(cfg.checkpoint).resolve())
    require_writable_dir(out, "--out")
    accelerator, shards = job_processes(out, cfg.wandb)
    with collective_failures(shards.world, DIST_TIMEOUT_S, None):
        scorer = scorer_for(str(_device()), shards)
        if generator is None:
            generated = scorer.score_images(images, shards)
        else:
            generated = score_generator(generator, scorer, cfg.n, cfg.seed, shards)
        floor = scorer.floor(shards=shards)
    result = {"source": source, "generated": generated, "real_floor": floor, "goal": goal_check(generated, floor),
              "config": asdict(cfg), "processes": shards.world}
    if shards.is_main:
        write_json_atomic(out / "metrics.json", result)
        plot_class_histogram(generated, floor, out / "class_histogram.png")
        print(format_report(generated, floor))
        print(f"FID / floor {result['goal']['fid_over_floor']:.2f} -> {out}/metrics.json, {out}/class_histogram.png")
    if accelerator is not None:   # every rank: the tracker (a null one off rank 0) ends the process group
        name = Path(source).stem if cfg.images else Path(source).name
        tracker = start_tracker(accelerator, cfg.wandb_project, f"evaluate-{name}", asdict(cfg), out,
                                job_type="evaluate", tags=run_tags(cfg.checkpoint)) if cfg.wandb \
            else NullTracker(accelerator)
        tracker.summary(summary_metrics(flat_metrics(result)))
        log_class_histogram(tracker, generated, floor, step=0)
        tracker.log_images({"figures/class_histogram": out / "class_histogram.png"}, step=0)
        tracker.finish()
    return result


def interpolate_main(argv: Sequence[str] | None = None) -> list[Walk]:
    """Every rank searches its share of the endpoint draws; rank 0 walks, draws and logs."""
    cfg = parse_config(InterpolateConfig, argv, description="Latent walks between digit pairs, linear and SLERP, "
                       "labelled by the shipped classifier.", prog="trainers/gan.py interpolate")
    generator, run_dir = _load_generator(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else run_dir / "eval"
    require_writable_dir(out, "--out")
    accelerator, shards = job_processes(out, cfg.wandb)
    with collective_failures(shards.world, DIST_TIMEOUT_S, None):
        walks, figures = interpolate(generator, scorer_for(str(_device()), shards), parse_pairs(cfg.pairs),
                                     cfg.steps, cfg.mode, out, cfg.draws, cfg.seed, shards)
    if accelerator is None:
        return _report_walks(walks, figures)
    tracker = start_tracker(accelerator, cfg.wandb_project, f"interpolate-{run_dir.name}", asdict(cfg), out,
                            job_type="interpolate", tags=run_tags(cfg.checkpoint)) if cfg.wandb else None
    if tracker is not None:
        tracker.log_images(figures, step=0)
        tracker.log_table("interp/walks", TABLE_COLUMNS, walk_rows(walks), step=0)
        tracker.finish()
    else:
        accelerator.end_training()
    return _report_walks(walks, figures)


def _report_walks(walks: list[Walk], figures: dict[str, Path]) -> list[Walk]:
    if walks:   # rank 0 (the others hold no walks)
        print_walks(walks)
        print("wrote " + ", ".join(str(p) for p in figures.values()))
    return walks


# --- the real-data floor on its own: python -m trainers.gan_eval --------------------------------

def floor_main(argv: Sequence[str] | None = None) -> dict:
    """Print the floor (10,000 real training images vs the test set) and what each piece costs."""
    import argparse
    import time

    from models.dcgan import Generator

    parser = argparse.ArgumentParser(prog="python -m trainers.gan_eval", description=floor_main.__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    torch.set_num_threads(parser.parse_args(argv).threads)
    t0 = time.perf_counter()
    scorer = Scorer("cpu")
    t1 = time.perf_counter()
    floor = scorer.floor()
    t2 = time.perf_counter()
    generator = Generator(base_channels=16).eval()      # the cpu-demo width, untrained
    stage = stage_metrics(generator, "cpu")
    t3 = time.perf_counter()
    small = scorer.floor(STAGE_SAMPLES)
    print(f"real-data floor: {FLOOR_SAMPLES:,} MNIST training images (fixed random subset) vs the 10,000 test images")
    print(format_report(floor, small, ("n=10,000", "n=2,000")))
    print(f"cost on {torch.get_num_threads()} thread(s): test-set statistics {t1 - t0:.1f}s, floor {t2 - t1:.1f}s, "
          f"one stage_metrics call ({STAGE_SAMPLES:,} samples of an untrained b=16 generator) {t3 - t2:.1f}s")
    print("stage_metrics of the untrained generator: " + ", ".join(f"{k} {v:.3f}" for k, v in stage.items()))
    return floor


if __name__ == "__main__":
    floor_main()
