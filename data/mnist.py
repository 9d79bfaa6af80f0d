"""MNIST from the committed IDX files, checked by the md5 of each decompressed file.

The four files under ``data/MNIST/raw/`` are the originals, gzipped (``gzip -9 -n``), so the
gzips' own md5s differ from torchvision's; we check the decompressed bytes instead. With
``root`` pointing anywhere else that holds no copy, torchvision's usual download path is used.
"""
from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data import DataError

DEFAULT_ROOT = Path(__file__).resolve().parent  # holds MNIST/raw/*.gz

# decompressed file -> (md5, size in bytes), from the MNIST distribution
FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7840016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10008),
}
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_verified(raw_dir: Path, name: str) -> bytes:
    """Bytes of ``name`` (gzipped or not) after checking its md5; DataError naming the path."""
    md5, size = FILES[name]
    gz, plain = raw_dir / f"{name}.gz", raw_dir / name
    path = gz if gz.exists() else plain
    if not path.exists():
        raise DataError(f"MNIST file {gz} is missing; restore it with `git checkout -- data/` "
                         "or pass --data-dir pointing at a folder holding MNIST/raw/")
    try:
        blob = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"MNIST file {path} is corrupt ({err}); restore it with "
                         "`git checkout -- data/`") from None
    if len(blob) != size or hashlib.md5(blob).hexdigest() != md5:
        raise DataError(f"MNIST file {path} is corrupt (md5 mismatch); restore it with "
                         "`git checkout -- data/`")
    return blob


def _parse_idx(blob: bytes) -> np.ndarray:
    ndim = blob[3]
    dims = [int.from_bytes(blob[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _has_local_copy(raw_dir: Path) -> bool:
    return any((raw_dir / n).exists() or (raw_dir / f"{n}.gz").exists() for n in FILES)


def _torchvision_mnist(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST
    try:
        ds = MNIST(str(root), train=split == "train", download=True)
    except Exception as err:  # no internet, unwritable root, ...
        raise DataError(f"--data-dir {root} holds no MNIST/raw/ files and torchvision could not "
                         f"download them ({err.__class__.__name__}); point --data-dir at the repo's "
                         "data/ folder") from None
    return ds.data, ds.targets.long()


@lru_cache(maxsize=4)
def load_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``, md5-checked."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.exists():
        raise DataError(f"--data-dir {root} does not exist; pass the folder that holds MNIST/raw/")
    raw_dir = root / "MNIST" / "raw"
    if not _has_local_copy(raw_dir):
        return _torchvision_mnist(root, split)
    images_name, labels_name = SPLITS[split]
    images = torch.from_numpy(_parse_idx(_read_verified(raw_dir, images_name)).copy())
    labels = torch.from_numpy(_parse_idx(_read_verified(raw_dir, labels_name)).astype(np.int64))
    return images, labels


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float ``(N, 1, 28, 28)`` in [-1, 1], the GAN's tanh range."""
    return images.unsqueeze(1).float().div(127.5).sub(1.0)
