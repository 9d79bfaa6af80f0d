"""Experiment tracking through Accelerate's tracker API, with a null tracker as fallback.

The training loops call ``tracker.log(...)`` and ``tracker.log_images(...)`` and never ask
whether wandb is there (nanochat's DummyWandb idea). wandb is imported lazily; without an
API key it runs offline, so ``wandb sync <run dir>`` can upload later and
``wandb beta leet <run dir>`` shows the run in a terminal now.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode() -> str:
    """WANDB_MODE wins; otherwise online with credentials and offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


def log_with(use_wandb: bool) -> list[str] | None:
    """The ``log_with`` argument for ``Accelerator``: wandb when asked for and installed."""
    return ["wandb"] if use_wandb and wandb_installed() else None


class NullTracker:
    """Does nothing, so the loop never checks whether tracking is on.

    Given the run's ``accelerator``, ``finish()`` still ends it (``end_training`` tears down the
    process group), so that every rank, tracking or not, leaves the group the same way.
    """

    run_dir: Path | None = None

    def __init__(self, accelerator=None):
        self.accelerator = accelerator

    def log(self, scalars: dict[str, float], step: int) -> None:
        pass

    def log_images(self, images: dict[str, str | Path], step: int) -> None:
        pass

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        pass

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()


class WandbTracker(NullTracker):
    """Logs through ``accelerator.log`` (main process only, as Accelerate does)."""

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.run = accelerator.get_tracker("wandb", unwrap=True)
        self.run_dir = Path(self.run.dir).parent  # .../wandb/offline-run-*/

    def log(self, scalars, step):
        self.accelerator.log({k: float(v) for k, v in scalars.items()}, step=step)

    def log_images(self, images, step):
        import wandb
        self.accelerator.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def log_table(self, key, columns, rows, step):
        import wandb
        self.accelerator.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=step)


def start_tracker(accelerator, project: str, run_name: str, config: dict, run_dir: Path,
                  group: str | None = None):
    """Start the run's tracker: wandb on the main process if the Accelerator logs to it."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return NullTracker(accelerator)
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir.mkdir(parents=True, exist_ok=True)
    init = {"name": run_name, "dir": str(run_dir), "mode": wandb_mode()}
    if group:
        init["group"] = group
    accelerator.init_trackers(project, config=config, init_kwargs={"wandb": init})
    return WandbTracker(accelerator)


def read_offline_run(wandb_file: str | Path) -> dict[str, Any]:
    """Read a ``run-*.wandb`` file back: ``{"history": [{key: value, "_step": n}, ...],
    "config": {...}, "run": {"name", "group", "project"}}``, for tests and for a quick look without a server.

    The file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
    ``crc32(4) length(2) type(1) payload`` chunks) of ``wandb_internal_pb2.Record`` messages.
    """
    import json
    from wandb.proto import wandb_internal_pb2 as pb

    blob = Path(wandb_file).read_bytes()
    if blob[:4] != b":W&B":
        raise ValueError(f"{wandb_file} is not a wandb transaction log")
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(blob):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(blob[pos + 4:pos + 6], "little")
        kind = blob[pos + 6]
        payload = blob[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    out: dict[str, Any] = {"history": [], "config": {}, "run": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item}
            out["history"].append(row)
        elif kind == "run":  # the run's identity: {"name", "group", "project"}
            out["run"] = {"name": rec.run.display_name, "group": rec.run.run_group, "project": rec.run.project}
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
