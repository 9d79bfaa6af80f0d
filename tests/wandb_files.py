"""Reading offline wandb runs back, for the tests: the run's history, summary, config and charts
from its ``run-*.wandb`` file, and wandb's own reading of it (``wandb leet inspect``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def read_offline_run(wandb_file: str | Path) -> dict[str, Any]:
    """Read a ``run-*.wandb`` file back, for tests and for a quick look without a server::

        {"history": [{key: value, "_step": n}, ...], "summary": {key: value}, "config": {...},
         "run": {"name", "group", "project", "job_type", "tags"}, "charts": {key: chart type},
         "exit_code": int or None (None: the run never finished)}

    Nested keys are joined with "/" (an image ``samples/grid`` gives ``samples/grid/path``, ...).

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
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "run": {}, "charts": {}, "exit_code": None}
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(item): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(item): json.loads(item.value_json) for item in rec.summary.update})
        elif kind == "run":  # the run's identity
            out["run"] = {"name": rec.run.display_name, "group": rec.run.run_group, "project": rec.run.project,
                          "job_type": rec.run.job_type, "tags": list(rec.run.tags)}
        elif kind == "config":
            for item in rec.config.update:
                name, value = key(item), json.loads(item.value_json)
                if name.startswith("_wandb/visualize/"):   # a native chart: {key: "wandb/bar/v0", ...}
                    out["charts"][name[len("_wandb/visualize/"):]] = value["panel_config"]["panelDefId"]
                else:
                    out["config"][name] = value
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def leet_summary(path: str | Path, timeout: float = 60) -> dict[str, Any] | None:
    """wandb's own reading of an offline run: ``wandb leet inspect --summary --json <path>`` (state,
    exit code, summary, tags, config), or ``None`` where this wandb has no ``leet`` command."""
    import json
    import shutil
    import subprocess
    import sys

    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    proc = subprocess.run([exe, "leet", "inspect", "--summary", "--json", str(path)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        if "No such command" in proc.stderr:
            return None
        raise RuntimeError(f"wandb leet inspect {path} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)
