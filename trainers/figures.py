"""Figure helpers shared by the trainers: headless matplotlib and atomic PNG writes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainers.files import atomic_path  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (temporary file, then rename) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def smooth(values, window: int):
    """Trailing moving average, same length as ``values``."""
    out, acc = [], 0.0
    for k, v in enumerate(values):
        acc += v
        if k >= window:
            acc -= values[k - window]
        out.append(acc / min(k + 1, window))
    return out
