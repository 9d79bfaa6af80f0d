"""Train the evaluation classifier (models/mnist_cnn.py) on the committed MNIST and ship its weights.

    python -m trainers.classifier                 # 2 epochs, a few minutes on 2 CPU cores, writes models/weights/mnist_cnn.pt
    python trainers/classifier.py --epochs 1 --out /tmp/cnn.pt

Writes ``<out>`` (the state dict) and ``<out minus .pt>.json`` (its sha256, test accuracy and
the config that produced it). ``load_classifier`` checks the sha256 before it trusts the file,
so a truncated or replaced weights file is an error that names the file and this command.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from data.mnist import load_mnist, to_unit_range
from models.mnist_cnn import MnistCNN
from trainers.cli import (UsageError, flatten, parse, require_at_least, require_non_negative, require_positive,
                          run_cli)
from trainers.files import atomic_path, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = REPO / "models" / "weights" / "mnist_cnn.pt"
RETRAIN = "python -m trainers.classifier"   # the command every load error points to
TARGET_ACCURACY = 0.99                      # the bar on the MNIST test set


@dataclass
class Data:
    """data"""
    data_dir: str = ""  # folder holding MNIST/raw/ (default: the repo's data/)
    shift: int = 1  # random translation of each training image, in pixels (0 = none)


@dataclass
class Optim:
    """optimisation"""
    epochs: int = 2  # passes over the 60,000 training images
    max_steps: int = 0  # stop after this many steps (0 = run all epochs; for tests)
    batch_size: int = 128  # images per step
    lr: float = 3e-3  # peak Adam learning rate of the one-cycle schedule
    weight_decay: float = 1e-4  # AdamW weight decay


@dataclass
class Run:
    """run"""
    num_threads: int = 0  # torch CPU threads (0: torch's default; 1 is faster on a busy 2-core machine)
    seed: int = 0  # seed of the initial weights, the shuffling and the shifts
    out: str = str(DEFAULT_WEIGHTS.relative_to(REPO))  # weights file to write (the .json sidecar goes beside it)


@dataclass
class ClassifierConfig:
    """Train the evaluation classifier on MNIST."""
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    run: Run = field(default_factory=Run)

    def validate(self) -> None:
        d, o, r = self.data, self.optim, self.run
        require_at_least(o.epochs, 1, "epochs")
        require_at_least(o.batch_size, 1, "batch_size")
        require_at_least(o.max_steps, 0, "max_steps")
        require_at_least(r.num_threads, 0, "num_threads")
        require_at_least(d.shift, 0, "shift")
        require_positive(o.lr, "lr")
        require_non_negative(o.weight_decay, "weight_decay")
        if not r.out.endswith(".pt"):
            raise UsageError(f"--out must name a .pt file, got {r.out!r}")


# --- weights on disk ----------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sidecar(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_weights(model: MnistCNN, path: Path, record: dict) -> Path:
    """Write the state dict atomically, then its sidecar with the sha256 of the bytes written."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        digest = sha256_of(tmp)
    write_json_atomic(sidecar(path), {"sha256": digest, "file": path.name, **record})
    return path


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> MnistCNN:
    """The trained classifier in eval mode, after checking the file against its sidecar's sha256."""
    path = Path(path) if path else DEFAULT_WEIGHTS
    meta_path = sidecar(path)
    if not path.exists() or not meta_path.exists():
        missing = path if not path.exists() else meta_path
        raise UsageError(f"classifier weights {missing} are missing; restore them with "
                         f"`git checkout -- models/weights/` or retrain with `{RETRAIN}`")
    try:
        expected = json.loads(meta_path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"classifier checksum file {meta_path} is corrupt; restore it with "
                         f"`git checkout -- models/weights/` or retrain with `{RETRAIN}`") from None
    if sha256_of(path) != expected:
        raise UsageError(f"classifier weights {path} are corrupt (sha256 mismatch); restore them with "
                         f"`git checkout -- models/weights/` or retrain with `{RETRAIN}`")
    model = MnistCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


# --- training -------------------------------------------------------------------------------

def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random whole number of pixels in [-pixels, pixels] per axis."""
    if pixels == 0:
        return x
    B, _, H, W = x.shape
    shifts = torch.randint(-pixels, pixels + 1, (B, 2), generator=generator).float()
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * shifts[:, 0] / W                    # normalised units: 2/W per pixel
    theta[:, 1, 2] = 2.0 * shifts[:, 1] / H
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


@torch.no_grad()
def accuracy(model: MnistCNN, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``images`` in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    hits = sum((model(images[i:i + batch].to(device)).argmax(1).cpu() == labels[i:i + batch]).sum().item()
               for i in range(0, len(images), batch))
    return hits / len(images)


def train(cfg: ClassifierConfig) -> dict:
    """Train, measure test accuracy, write the weights and the sidecar; return the record."""
    cfg.validate()
    from accelerate import Accelerator

    d, o, r = cfg.data, cfg.optim, cfg.run
    if r.num_threads:
        torch.set_num_threads(r.num_threads)

    root = d.data_dir or None
    train_x, train_y = load_mnist("train", root)
    test_x, test_y = load_mnist("test", root)
    train_set = TensorDataset(to_unit_range(train_x), train_y)   # (60000, 1, 28, 28) in [-1, 1]
    torch.manual_seed(r.seed)
    model = MnistCNN()
    loader = DataLoader(train_set, batch_size=o.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(r.seed))
    steps = len(loader) * o.epochs if o.max_steps == 0 else min(o.max_steps, len(loader) * o.epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=o.lr, total_steps=steps)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    shifts = torch.Generator().manual_seed(r.seed + 1)

    t0, step = time.perf_counter(), 0
    model.train()
    while step < steps:
        for x, y in loader:
            x = random_shift(x.cpu(), d.shift, shifts).to(accelerator.device)
            loss = F.cross_entropy(model(x), y)       # softmax + NLL of the true digit
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 100 == 0 or step == steps:
                accelerator.print(f"step {step}/{steps}  loss {loss.item():.4f}  "
                                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            if step == steps:
                break
    unwrapped = accelerator.unwrap_model(model)
    test_acc = accuracy(unwrapped, to_unit_range(test_x), test_y)
    record = {"test_accuracy": round(test_acc, 4), "steps": step, "train_seconds": round(time.perf_counter() - t0, 1),
              "torch": torch.__version__, "command": RETRAIN, "config": flatten(cfg)}
    out = Path(r.out) if Path(r.out).is_absolute() else Path.cwd() / r.out
    save_weights(unwrapped.cpu(), out, record)
    if test_acc < TARGET_ACCURACY:
        print(f"warning: test accuracy {test_acc:.4f} is below the {TARGET_ACCURACY:.2f} target", file=sys.stderr)
    return {**record, "out": str(out)}


def main(argv=None) -> dict:
    cfg = parse(ClassifierConfig, argv, prog="trainers/classifier.py", description=__doc__.splitlines()[0])
    record = train(cfg)
    print(f"test accuracy {record['test_accuracy']:.4f} after {record['steps']} steps in "
          f"{record['train_seconds']:.0f}s -> {record['out']} (sha256 in {sidecar(Path(record['out'])).name})")
    return record


if __name__ == "__main__":
    run_cli(main)
