"""Experiment tracking through Accelerate's tracker API, with a null tracker as fallback.

The training loops call ``tracker.log(...)`` and ``tracker.log_images(...)`` and never ask
whether wandb is there (nanochat's DummyWandb idea). wandb is imported lazily; without an
API key it runs offline, so ``wandb sync <run dir>`` can upload later and
``wandb beta leet <run dir>`` shows the run in a terminal now.

A trainer's run keeps its wandb run id in the run folder (``wandb-run.json``), so that
``--resume`` continues the same wandb run online; offline, where wandb cannot resume a run, each
segment is a run of its own with the same name and group, tagged ``resumed``.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


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
        """Scalars as history series (curves against ``step``)."""

    def log_images(self, images: dict[str, str | Path | tuple[str | Path, str]], step: int,
                   caption: str | None = None) -> None:
        """PNG files; a value ``(path, caption)`` or ``caption`` for all sets the text under the image."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A ``wandb.Table``."""

    def log_bar(self, key: str, labels: Sequence[Any], series: dict[str, Sequence[float]], step: int,
                title: str = "") -> None:
        """A native bar chart: one bar per (label, series), the series side by side per label."""

    def log_lines(self, key: str, xs: Sequence[float], ys: dict[str, Sequence[float]], step: int,
                  title: str = "", xname: str = "x") -> None:
        """A native line plot: one line per entry of ``ys`` against the shared ``xs``."""

    def summary(self, values: dict[str, Any]) -> None:
        """End-of-run numbers: the run summary, not one-point history series."""

    def log_model(self, write: Callable[[Path], Any], aliases: Sequence[str] = ("latest", "best"),
                  metadata: dict[str, Any] | None = None) -> None:
        """A ``model`` artifact: the folder ``write(folder)`` fills (an export), with ``aliases``."""

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()


def bar_rows(labels: Sequence[Any], series: dict[str, Sequence[float]]) -> list[list[Any]]:
    """Rows ``(bar, label, series, value)`` of a grouped bar chart; ``bar`` ("3 generated") sorts
    the series of one label next to each other."""
    rows = []
    for k, label in enumerate(labels):
        for name, values in series.items():
            rows.append([f"{label} {name}", str(label), name, float(values[k])])
    return rows


BAR_COLUMNS = ("bar", "label", "series", "value")


class WandbTracker(NullTracker):
    """Logs through ``accelerator.log`` (main process only, as Accelerate does).

    A run resumed online starts at wandb's next step (``run.starting_step``, one past the last step the
    run holds). The steps a killed segment logged after its last checkpoint are trained again;
    their scalars are not logged a second time (wandb would refuse them), and the end-of-run media
    of a run resumed at its last step go to the run's next step."""

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.run = accelerator.get_tracker("wandb", unwrap=True)
        self.run_dir = Path(self.run.dir).parent  # .../wandb/offline-run-*/
        self.first_step = self.run.starting_step   # 0 for a new run; online resumed: one past the last step held

    def _log(self, values: dict, step: int, media: bool = True) -> None:
        if step < self.first_step:
            if not media:
                return
            step = self.first_step
        self.accelerator.log(values, step=step)

    def log(self, scalars, step):
        self._log({k: float(v) for k, v in scalars.items()}, step, media=False)

    def log_images(self, images, step, caption=None):
        import wandb
        out = {}
        for key, value in images.items():
            path, text = value if isinstance(value, tuple) else (value, caption)
            out[key] = wandb.Image(str(path), caption=text)
        self._log(out, step)

    def log_table(self, key, columns, rows, step):
        import wandb
        self._log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step)

    def log_bar(self, key, labels, series, step, title=""):
        import wandb
        table = wandb.Table(columns=list(BAR_COLUMNS), data=bar_rows(labels, series))
        self._log({key: wandb.plot.bar(table, "bar", "value", title=title or key)}, step)

    def log_lines(self, key, xs, ys, step, title="", xname="x"):
        import wandb
        chart = wandb.plot.line_series(xs=[float(x) for x in xs], ys=[[float(v) for v in y] for y in ys.values()],
                                       keys=list(ys), title=title or key, xname=xname)
        self._log({key: chart}, step)

    def summary(self, values):
        self.run.summary.update(dict(values))

    def log_model(self, write, aliases=("latest", "best"), metadata=None):
        """One version of the artifact ``model-<run id>`` per call (Lightning's and transformers' name).
        ``add_dir`` copies each file into wandb's staging folder at once, so the folder is temporary;
        offline, ``wandb sync`` uploads the staged files with the run."""
        import wandb
        from trainers.cli import UsageError
        with tempfile.TemporaryDirectory(prefix="palgan-model-") as tmp:
            folder = Path(tmp) / "model"
            try:
                write(folder)
            except UsageError as err:   # the [export] packages are missing: the run itself is complete
                print(f"wandb model artifact skipped: {err}", flush=True)
                return
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=dict(metadata or {}))
            artifact.add_dir(str(folder))
            self.run.log_artifact(artifact, aliases=list(aliases))


def precision_tag(mixed_precision: str | None) -> str:
    """``fp32`` for Accelerate's "no", else the autocast precision (bf16, fp16)."""
    return "fp32" if mixed_precision in (None, "", "no") else str(mixed_precision)


RUN_ID_FILE = "wandb-run.json"   # in a trainer's run folder: the wandb run that --resume continues


def read_run_id(run_dir: Path) -> str | None:
    """The wandb run id kept in ``run_dir``, or ``None`` (no file, or one that cannot be read)."""
    import json
    try:
        return str(json.loads((Path(run_dir) / RUN_ID_FILE).read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_init_kwargs(mode: str, run_name: str, group: str | None, resumed_from: int,
                       kept_id: str | None) -> dict:
    """What ``wandb.init`` gets for one segment of a trainer's run, beyond name, dir and mode.

    Every segment is in the group ``group`` (the run's name when none is given). A segment
    resumed from a checkpoint (``resumed_from`` > 0) is tagged ``resumed`` (see ``start_tracker``);
    online it continues the kept run (``id``, ``resume="allow"``); offline, where wandb cannot
    resume a run, it is a new run of the same name and group."""
    init: dict = {"group": group or run_name}
    if resumed_from > 0 and kept_id and mode == "online":
        init.update(id=kept_id, resume="allow")
    return init


def start_tracker(accelerator, project: str, run_name: str, config: dict, run_dir: Path,
                  group: str | None = None, job_type: str | None = None, tags: Sequence[str] = (),
                  resumed_from: int | None = None):
    """Start the run's tracker: wandb on the main process if the Accelerator logs to it.

    ``job_type`` (train, evaluate, interpolate, sweep-trial, sweep-summary) and ``tags`` (model or
    preset, T) let the dashboard group and filter runs; the Accelerator's precision is added as a
    last tag (fp32, bf16 or fp16).

    A trainer passes ``resumed_from``, the step its checkpoint holds (0 for a new run): the run id
    is then kept in ``run_dir/wandb-run.json`` (see ``resume_init_kwargs``), and a resumed segment
    is tagged ``resumed`` and records ``resumed_from_step`` in its config."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return NullTracker(accelerator)
    from trainers.files import write_json_atomic
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir.mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()
    init = {"name": run_name, "dir": str(run_dir), "mode": mode}
    kept = read_run_id(run_dir) if resumed_from else None
    if resumed_from is not None:
        init.update(resume_init_kwargs(mode, run_name, group, resumed_from, kept))
    elif group:
        init["group"] = group
    if job_type:
        init["job_type"] = job_type
    init["tags"] = [str(t) for t in tags] + [precision_tag(accelerator.mixed_precision)]
    if resumed_from:
        init["tags"].append("resumed")
        config = {**config, "resumed_from_step": resumed_from}
    accelerator.init_trackers(project, config=config, init_kwargs={"wandb": init})
    tracker = WandbTracker(accelerator)
    if resumed_from is not None and kept is None:   # the segment that starts the run (or the first with an id)
        write_json_atomic(run_dir / RUN_ID_FILE, {"id": tracker.run.id, "project": project, "name": run_name,
                                                  "group": init["group"], "mode": mode})
    return tracker
