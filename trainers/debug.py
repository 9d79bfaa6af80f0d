"""Per-rank facts for tests and for debugging a distributed run, behind ``PALGAN_DEBUG=1``.

With the switch set (in the launcher's environment, so every rank sees it), a trainer gathers a
few per-rank values at the end of a run (a hash of each rank's weights, of its first batch, the
images it scored) and rank 0 writes them to ``<run>/debug.json``. Without it nothing is gathered
and nothing is written: users' metrics.json and wandb runs hold only what they read.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from trainers.files import write_json_atomic

SWITCH = "PALGAN_DEBUG"


def enabled() -> bool:
    return os.environ.get(SWITCH, "") not in ("", "0")


def fingerprint(*tensors: torch.Tensor) -> int:
    """A 63-bit hash of the tensors' exact bytes (equal iff bit-identical, barring collisions)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def record(accelerator, run_dir: Path, **values: int) -> None:
    """Gather each integer value from every rank (a collective, on every rank, in the same order)
    and write ``{name: [rank 0's, rank 1's, ...]}`` to ``<run>/debug.json`` on rank 0."""
    if not enabled():
        return
    out = {}
    for name, value in values.items():
        t = torch.tensor([int(value)], dtype=torch.int64, device=accelerator.device)
        out[name] = [int(v) for v in accelerator.gather(t).tolist()]
    if accelerator.is_main_process:
        write_json_atomic(Path(run_dir) / "debug.json", out)
