"""Export a trained model into a folder that loads without palgan.

    python trainers/gan.py export --checkpoint runs/<run>     # the generator the run reports (EMA where kept)
    python trainers/lstm.py export --checkpoint runs/<run>    # the checkpoint of the best validation

The folder (``--out``, default ``<run>/model``) holds the same weights four ways:

    config.json + model.safetensors   the Hugging Face layout (huggingface_hub's PyTorchModelHubMixin):
                                      ``Generator.from_pretrained(folder)``, ``LSTM.from_pretrained(folder)``
    model.pt2                         a torch.export program: ``torch.export.load(path).module()``, torch only
    model.onnx                        the same graph through torch's dynamo ONNX exporter, for onnxruntime
    README.md                         the model card: the model, its training, its metrics, how to load it

Both graphs take any batch size (their first dimension is dynamic); the LSTM's take the sequence
length it was trained on (its time loop is unrolled by torch.export). The folder is written
beside its place and renamed into it once complete, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from trainers.cli import UsageError, parse, require_writable_dir
from trainers.files import atomic_path

FILES = ("config.json", "model.safetensors", "model.pt2", "model.onnx", "README.md")
PACKAGES = ("onnx", "onnxscript")   # torch.onnx.export(dynamo=True) needs both; onnxruntime runs the result


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a run folder, its checkpoints/ folder or one checkpoint folder
    out: str = ""  # folder to write (default: <run>/model); an existing one must be empty or an earlier export

    def validate(self) -> None:
        if not self.checkpoint:
            raise UsageError("export: --checkpoint is required (a run folder or one of its checkpoint folders)")


def parse_export_args(argv: Sequence[str] | None, prog: str, what: str) -> ExportConfig:
    return parse(ExportConfig, argv, prog=prog, description=f"Export {what} into a folder that loads without "
                 "palgan: config.json + model.safetensors, model.pt2, model.onnx and a model card.")


def run_folder(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: the folder holding its ``checkpoints/``."""
    for parent in Path(checkpoint).resolve().parents:
        if parent.name == "checkpoints":
            return parent.parent
    return Path(checkpoint).resolve()


def check_out(out: Path) -> Path:
    """``--out`` can be written: not a file, and empty or an earlier export (which is replaced)."""
    require_writable_dir(out, "--out")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if others:
            raise UsageError(f"--out {out} holds other files ({others[0]}, ...); pass a new or empty folder")
    return out


def require_packages() -> None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"export needs {', '.join(missing)}: pip install -e '.[export]'")


def export_folder(model: nn.Module, config: dict, example: Tensor, input_name: str, output_name: str,
                  card: str, out: Path, graphs: bool = True) -> Path:
    """Write ``out``: ``model`` (a PyTorchModelHubMixin in eval mode on the CPU; a copy, as its gradients
    are turned off) by ``save_pretrained`` with ``config`` as config.json, its torch.export program for
    inputs shaped like ``example`` with a dynamic batch, that program through the ONNX exporter, and
    ``card`` as README.md. ``graphs=False``: config.json and model.safetensors alone (milliseconds, where
    the two graphs take seconds), with the library's own card."""
    if not graphs:
        with torch.no_grad(), atomic_path(out) as tmp:
            model.save_pretrained(tmp, config=config)
        return out
    require_packages()
    model.requires_grad_(False)   # the loaded program then computes no gradients (an inference model)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "README.md").write_text(card)   # first: save_pretrained writes a generic card where there is none
        model.save_pretrained(tmp, config=config)
        program = torch.export.export(model, (example,), dynamic_shapes={input_name: {0: batch}})
        torch.export.save(program, tmp / "model.pt2")
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[input_name],
                                         output_names=[output_name], external_data=False, verbose=False)
        onnx_program.save(str(tmp / "model.onnx"))
        for path in tmp.iterdir():   # safetensors writes its file owner-only; the folder is for sharing
            path.chmod((tmp / "README.md").stat().st_mode)
    return out


def metrics_table(rows: Sequence[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    """A markdown table of ``(metric, this model, reference)`` rows."""
    lines = [f"| {' | '.join(header)} |", "|---|---:|---:|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def config_lines(config: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"`{k}={config[k]}`" for k in keys if k in config)
