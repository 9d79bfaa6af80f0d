"""Export a palindrome LSTM (or RNN) into a folder that loads without palgan (see ``trainers/export.py``).

    python trainers/lstm.py export --checkpoint runs/<run>                # best validation -> runs/<run>/model/
    python trainers/lstm.py export --checkpoint runs/<run>/checkpoints/step_00010000 --out last

A run folder (or its checkpoints/ folder) gives the checkpoint of the run's best validation.
The exported graphs run the plain time loop (the eager backend, unrolled by torch.export over
the T-1 input steps the model was trained on), on the CPU in float32.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.lstm import LSTM
from models.rnn import RNN
from trainers.checkpoint import BEST, META, list_checkpoints, read_meta
from trainers.cli import UsageError
from trainers.export import check_out, config_lines, export_folder, metrics_table, parse_export_args, run_folder

DIGITS = (3, 1, 4, 1, 5, 9, 2, 6, 5, 3)   # the card's palindrome: these, then mirrored

CARD = """---
library_name: palgan
tags: [{model}, palindromes, pytorch_model_hub_mixin]
---
# {title} that completes palindromes of length {T}

{what} It reads the first {L} digits of a palindrome of length {T} (d_i = d_(T-1-i)), {encoding},
and returns logits `(B, {K})` over the last digit, which equals the first: the network must carry
the first digit across {L} steps. Hidden size {H}; {params:,} parameters in float32.

## Use it

With torch alone (no palgan), in this folder:

```python
import torch
model = torch.export.load("model.pt2").module()
print(model({example}).argmax(1))   # the last digit of {palindrome} is {last}
```

The same graph for onnxruntime: `onnxruntime.InferenceSession("model.onnx").run(None, {{"x": x}})`
with `x` a float32 array of shape (batch, {L}, {D}). Both take any batch size and sequences of
exactly {L} digits. With palgan installed, `{cls}.from_pretrained(folder)` (`from {module} import {cls}`)
rebuilds the module from `config.json` and `model.safetensors`; `push_to_hub` publishes it.

## Training

Trained by palgan (`python trainers/lstm.py`) on palindromes drawn at random on the fly (a
seeded stream per process), {steps} steps, cross-entropy on the last step, RMSprop. Settings:
{settings}.

## Metrics

{metrics}
"""

SETTINGS = ("model", "seq_length", "input_encoding", "hidden_dim", "lr", "batch_size", "steps", "clip_norm",
            "forget_bias", "mixed_precision", "seed")


def eager_copy(model: nn.Module) -> nn.Module:
    """``model``'s weights in a CPU fp32 module of the same class with the plain-loop backend."""
    copy = type(model)(model.input_dim, model.hidden_dim, model.output_dim, backend="eager")
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


def encode(digits: torch.Tensor, encoding: str, num_classes: int) -> torch.Tensor:
    return F.one_hot(digits, num_classes).float() if encoding == "onehot" else digits.unsqueeze(-1).float()


def example_palindrome(T: int) -> list[int]:
    half = [DIGITS[k % len(DIGITS)] for k in range((T + 1) // 2)]
    return half + half[: T // 2][::-1]


def validation_at(history: Sequence[dict], step: int) -> dict | None:
    """The validation row logged at ``step``, if there was one."""
    return next((r for r in history if r.get("step") == step and "val/acc" in r), None)


def model_card(model: nn.Module, config: dict, step: int, validation: dict | None) -> str:
    T, encoding, K = config["seq_length"], config.get("input_encoding", "onehot"), model.output_dim
    palindrome = example_palindrome(T)
    digits = f"torch.tensor([{palindrome[:-1]}])"
    example = (f"torch.nn.functional.one_hot({digits}, {K}).float()" if encoding == "onehot"
               else f"{digits}.unsqueeze(-1).float()")
    lstm = isinstance(model, LSTM)
    if validation is None:
        metrics = (f"Step {step} has no validation pass; the run's metrics.json and its checkpoints/best/ "
                   "hold the validated ones.")
    else:
        rows = [("validation accuracy", f"{validation['val/acc']:.4f}", f"{1 / K:.4f}"),
                ("validation loss (cross-entropy)", f"{validation['val/loss']:.4f}", f"{math.log(K):.4f}")]
        metrics = (f"On the fixed validation set of {config.get('val_size', '?'):,} palindromes (held out, the same "
                   f"for every run of this length), at step {step}, beside chance (a uniform guess):\n\n"
                   + metrics_table(rows, ("metric", "this model", "chance")))
    return CARD.format(
        model=config.get("model", "lstm"), title="An LSTM" if lstm else "A vanilla RNN", T=T, L=T - 1, K=K,
        H=model.hidden_dim, D=model.input_dim,
        what=("An LSTM written from its gate equations (candidate g, input, forget and output gates i, f, o,\n"
              "cell c, hidden state h), with a linear read-out p of the last hidden state." if lstm else
              "A vanilla RNN, h_t = tanh(x_t W_hx + h_(t-1) W_hh + b_h), with a linear read-out p of the\n"
              "last hidden state."),
        encoding="one-hot `(B, T-1, 10)`" if encoding == "onehot" else "as one number each `(B, T-1, 1)`",
        params=sum(p.numel() for p in model.parameters()), example=example,
        palindrome=" ".join(map(str, palindrome)), last=palindrome[-1], cls=type(model).__name__,
        module="models.lstm" if lstm else "models.rnn", steps=step, settings=config_lines(config, SETTINGS),
        metrics=metrics)


def export_model(model: nn.Module, config: dict, step: int, validation: dict | None, out: Path,
                 graphs: bool = True) -> Path:
    """Export ``model`` (an LSTM or RNN, any backend and device) into ``out`` (``graphs``: see export_folder)."""
    copy = eager_copy(model)
    example = encode(torch.tensor([example_palindrome(config["seq_length"])[:-1]] * 2),
                     config.get("input_encoding", "onehot"), copy.output_dim)   # (2, T-1, D)
    dims = {"input_dim": copy.input_dim, "hidden_dim": copy.hidden_dim, "output_dim": copy.output_dim}
    return export_folder(copy, dims, example, "x", "logits", model_card(copy, config, step, validation), out, graphs)


def load_checkpoint_model(ckpt: Path) -> tuple[nn.Module, dict]:
    """The model of a checkpoint (its class from the saved config, its sizes from the weights), eager, on
    the CPU, and the checkpoint's meta record."""
    from safetensors.torch import load_file
    meta = read_meta(ckpt)
    config = meta.get("config", {})
    try:
        state = load_file(str(ckpt / "model.safetensors"))
        cls, first = (LSTM, "W_x") if config.get("model", "lstm") == "lstm" else (RNN, "W_hx")
        model = cls(state[first].shape[0], state["W_ph"].shape[0], state["W_ph"].shape[1], backend="eager")
        model.load_state_dict(state)
    except Exception as err:  # missing, truncated or foreign files
        raise UsageError(f"checkpoint {ckpt} cannot be loaded ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else ''}); pass another checkpoint") from None
    return model.eval(), meta


def best_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, else the best validation's checkpoint of a run or checkpoints/ folder."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist; pass a run folder or one of its checkpoint folders")
    if (path / META).exists():
        return path
    for candidate in (path / "checkpoints" / BEST, path / BEST, path):
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise UsageError(f"no checkpoint found in {path}; pass a run folder or one of its checkpoint folders")


def export_checkpoint(ckpt: Path, out: Path, graphs: bool = True) -> Path:
    model, meta = load_checkpoint_model(ckpt)
    step = int(meta["step"])
    return export_model(model, meta.get("config", {}), step,
                        validation_at(meta.get("extra", {}).get("history", []), step), out, graphs)


def export_main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_export_args(argv, "trainers/lstm.py export", "an LSTM or RNN checkpoint")
    ckpt = best_checkpoint(Path(cfg.checkpoint))
    out = check_out(Path(cfg.out) if cfg.out else run_folder(ckpt) / "model")
    export_checkpoint(ckpt, out)
    print(f"exported {ckpt} -> {out}")
    return out
