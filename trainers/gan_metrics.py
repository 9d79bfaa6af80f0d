"""GAN metrics from the shipped MNIST classifier, each beside the same number for real digits.

    python -m trainers.gan_metrics --threads 1      # the real-data floor alone, with what each piece costs

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

The classifier's outputs for the test set and for the floor's images depend only on the weights,
so they are computed once and kept in ``$PALGAN_CACHE`` (default ``~/.cache/palgan``), under the
weights' sha256; a missing or unreadable cache file is recomputed.

With several processes every rank calls the scorer with the job's ``Shards``: each rank classifies
its own contiguous share of the images, the features and class probabilities are gathered in order
on every rank, and the metrics are computed from exactly the rows one process would have made.
The FID metric never synchronises by itself (``sync_on_compute=False``): its inputs are already
complete on every rank, so a rank-0-only ``compute`` cannot wait for the others.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.mnist import load_mnist, to_unit_range
from models.mnist_cnn import FEATURE_DIM, NUM_CLASSES
from trainers.cli import UsageError, parse, require_at_least, run_cli
from trainers.figures import plt, save_figure
from trainers.files import atomic_path
from trainers.gan_sampling import generate
from trainers.runtime import SINGLE, Shards, generator_for

STAGE_SAMPLES = 2_000       # images per stage_metrics call: ~seconds on a 2-core CPU
FULL_SAMPLES = 10_000       # images for the final numbers, as many as the floor uses
TEST_SAMPLES = 10_000       # the MNIST test set: the FID's reference statistics
FLOOR_SAMPLES = 10_000      # real MNIST training images that give the floor
FLOOR_STREAM = 5_555        # seed key of the floor's random subset of the training set
BATCH = 500                 # images per generator / classifier call
CACHE_ENV = "PALGAN_CACHE"  # folder of the cached classifier outputs (default ~/.cache/palgan)


# --- the classifier's outputs on real images, cached on disk ---------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "palgan").expanduser()


def read_cached(path: Path, key: dict, n: int) -> tuple[Tensor, Tensor] | None:
    """``(features (n, 128) float64, log p(y|x) (n, 10))`` from a cache file written for ``key``,
    or None when the file is missing, unreadable, for another key or of the wrong shape."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        features, log_probs = blob["features"], blob["log_probs"]
        ok = (json.loads(blob["key"]) == key
              and features.shape == (n, FEATURE_DIM) and features.dtype == torch.float64
              and log_probs.shape == (n, NUM_CLASSES) and log_probs.dtype == torch.float32
              and bool(torch.isfinite(features).all()) and not bool(torch.isnan(log_probs).any()))
    except Exception:  # noqa: BLE001 - missing, truncated, not a torch file, other contents
        return None
    return (features, log_probs) if ok else None


def write_cached(path: Path, key: dict, features: Tensor, log_probs: Tensor) -> None:
    """Write a cache file atomically; a cache that cannot be written only costs a recomputation."""
    try:
        with atomic_path(path) as tmp:
            torch.save({"key": json.dumps(key, sort_keys=True), "features": features, "log_probs": log_probs}, tmp)
    except (OSError, RuntimeError):
        pass


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
        from trainers.classifier import DEFAULT_WEIGHTS, load_classifier, sidecar

        self.device = torch.device(device)
        self.images_scored = 0          # images this process put through the classifier
        self.classifier = load_classifier(weights, self.device)   # checks the file's sha256 first
        self.weights_sha256 = json.loads(sidecar(Path(weights or DEFAULT_WEIGHTS)).read_text())["sha256"]
        self.fid = FrechetInceptionDistance(feature=FeatureInput(), reset_real_features=False,
                                            sync_on_compute=False)
        test_features, _ = self.real_outputs("test", TEST_SAMPLES, lambda: torch.arange(TEST_SAMPLES), shards)
        self.fid.update(test_features, real=True)
        self._floor: tuple[Tensor, Tensor] | None = None

    def cache_key(self, split: str, n: int, stream: int | None) -> dict:
        """What the classifier's outputs on real images depend on."""
        return {"weights_sha256": self.weights_sha256, "split": split, "n": n, "stream": stream,
                "device": self.device.type, "torch": torch.__version__}

    def real_outputs(self, split: str, n: int, pick: Callable[[], Tensor], shards: Shards = SINGLE,
                     stream: int | None = None) -> tuple[Tensor, Tensor]:
        """Features and log p(y|x) of the MNIST ``split`` images ``pick()`` (``n`` of them), from the
        cache when every rank finds it there, else classified (each rank its share) and cached."""
        key = self.cache_key(split, n, stream)
        seed = "" if stream is None else f"-seed{stream}"
        path = cache_dir() / f"mnist_cnn-{self.weights_sha256[:16]}" / \
            f"{split}-n{n}{seed}-{self.device.type}-torch{torch.__version__}.pt"
        found = read_cached(path, key, n)
        if shards.world > 1:   # all ranks read or all compute: the computation is a collective
            hits = shards.gather(torch.tensor([[int(found is not None)]]), shards.world)   # (world, 1)
            found = found if bool(hits.all()) else None
        if found is not None:
            return found
        images, _ = load_mnist(split)
        part = shards.part(n)
        features, log_probs = self.features_and_log_probs(to_unit_range(images[pick()[part.start:part.stop]]))
        features, log_probs = shards.gather(features, n), shards.gather(log_probs, n)
        if shards.is_main:
            write_cached(path, key, features, log_probs)
        return features, log_probs

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
        """The same metrics for the first ``n`` of a fixed random FLOOR_SAMPLES of the MNIST training images."""
        if self._floor is None:
            self._floor = self.real_outputs("train", FLOOR_SAMPLES, floor_indices, shards, stream=FLOOR_STREAM)
        features, log_probs = self._floor
        return self.metrics(features[:n], log_probs[:n])

    @torch.no_grad()
    def classify(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Predicted class, its confidence and the full p(y|x) ``(N, 10)``."""
        _, log_probs = self.features_and_log_probs(images)
        probs = log_probs.exp()
        conf, pred = probs.max(1)
        return pred, conf, probs


def floor_indices() -> Tensor:
    """Which of the 60,000 MNIST training images make the floor: a fixed random FLOOR_SAMPLES."""
    return torch.randperm(60_000, generator=generator_for(FLOOR_STREAM))[:FLOOR_SAMPLES]


_SCORERS: dict[str, Scorer] = {}


def images_scored() -> int:
    """Images this process has put through the classifier, over all its scorers (for debug.json)."""
    return sum(s.images_scored for s in _SCORERS.values())


def device_key(device: str | torch.device) -> str:
    """One name per device: "cpu:0" and "cpu" are "cpu"; "cuda" is the current GPU's "cuda:<index>"."""
    d = torch.device(device)
    if d.type == "cpu":
        return "cpu"
    if d.index is None:
        d = torch.device(d.type, getattr(torch, d.type).current_device())
    return str(d)


def scorer_for(device: str | torch.device = "cpu", shards: Shards = SINGLE) -> Scorer:
    """One Scorer per device and process: the test-set statistics are computed once (shared out
    across ``shards``; every rank calls this at the same point, so a cached scorer is cached on all)."""
    key = device_key(device)
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(key, shards=shards)
    return _SCORERS[key]


# --- the numbers -----------------------------------------------------------------------------

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


def fid_over_floor(generated: dict, floor: dict) -> float:
    """How many times the real-data floor's FID the generated images' FID is."""
    return round(generated["fid"] / floor["fid"], 2)


# --- a generator's numbers -------------------------------------------------------------------

def score_generator(generator: nn.Module, scorer: Scorer, n: int, seed: int = 0,
                    shards: Shards = SINGLE) -> dict:
    """Metrics of the generator's ``n`` samples (the images ``trainers/gan.py sample --n n --seed
    seed`` writes); each rank generates and classifies its share."""
    part = shards.part(n)
    return scorer.score_part(generate(generator, n, seed, part=part), n, shards)


def full_metrics(generator: nn.Module, scorer: Scorer, n: int | None = None, seed: int = 0,
                 shards: Shards = SINGLE) -> dict:
    """``{"generated": metrics of n (default 10,000) samples, "real_floor": the floor's}``."""
    return {"generated": score_generator(generator, scorer, n or FULL_SAMPLES, seed, shards),
            "real_floor": scorer.floor(shards=shards)}


def stage_metrics(generator: nn.Module, device: str | torch.device = "cpu", shards: Shards = SINGLE,
                  n: int = STAGE_SAMPLES) -> dict[str, float]:
    """Cheap metrics for one training stage, from 2,000 samples. FID is biased upwards at small n
    (the real-data floor is 4.5 at n=2,000 and 1.9 at n=10,000), so stage FIDs show the trend and
    the final 10,000-sample numbers are the ones to compare with the floor. A collective under ``shards``."""
    return stage_numbers(score_generator(generator, scorer_for(device, shards), n, shards=shards))


def stage_numbers(m: dict) -> dict[str, float]:
    """A stage's ``eval/*`` scalars from one set's metrics."""
    return {f"eval/{k}": m[k] for k in ("fid", "classifier_score", "class_entropy", "min_class_frac", "max_class_frac")}


# --- reports ---------------------------------------------------------------------------------

def plot_class_histogram(generated: dict, floor: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = torch.arange(NUM_CLASSES).numpy()
    ax.bar(x - 0.2, generated["class_hist"], 0.4, label=f"generated (n={generated['n']})")
    ax.bar(x + 0.2, floor["class_hist"], 0.4, label=f"real MNIST train (n={floor['n']})")
    ax.axhline(1 / NUM_CLASSES, color="gray", ls="--", lw=0.8, label="uniform (10%)")
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


# --- the real-data floor on its own: python -m trainers.gan_metrics ---------------------------

@dataclass
class FloorConfig:
    threads: int = 0  # torch CPU threads (0: torch's default)

    def validate(self) -> None:
        require_at_least(self.threads, 0, "threads")


def floor_main(argv: Sequence[str] | None = None) -> dict:
    """Print the floor (10,000 real training images vs the test set) and what each piece costs."""
    from models.dcgan import Generator

    cfg = parse(FloorConfig, argv, prog="python -m trainers.gan_metrics", description=floor_main.__doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    scorer = Scorer("cpu")
    t1 = time.perf_counter()
    floor = scorer.floor()
    t2 = time.perf_counter()
    generator = Generator(base_channels=16).eval()      # the cpu-demo width, untrained
    stage = score_generator(generator, scorer, STAGE_SAMPLES)
    t3 = time.perf_counter()
    small = scorer.floor(STAGE_SAMPLES)
    print(f"real-data floor: {FLOOR_SAMPLES:,} MNIST training images (fixed random subset) vs the 10,000 test images")
    print(format_report(floor, small, ("n=10,000", "n=2,000")))
    print(f"cost on {torch.get_num_threads()} thread(s): the scorer (classifier, torchmetrics, test-set statistics) "
          f"{t1 - t0:.1f}s, floor {t2 - t1:.1f}s (the classifier's outputs on real images are cached in "
          f"{cache_dir()}), one stage_metrics call ({STAGE_SAMPLES:,} samples of an untrained b=16 generator) "
          f"{t3 - t2:.1f}s")
    print("stage_metrics of the untrained generator: " +
          ", ".join(f"{k} {v:.3f}" for k, v in stage_numbers(stage).items()))
    return floor


if __name__ == "__main__":
    run_cli(floor_main)
