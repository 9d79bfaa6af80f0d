"""Export a DCGAN generator into a folder that loads without palgan (see ``trainers/export.py``).

    python trainers/gan.py export --checkpoint runs/<run>                 # -> runs/<run>/model/
    python trainers/gan.py export --checkpoint runs/<run>/checkpoints/step_00000500 --out g500

The generator is the one the run reports: the EMA one where the run kept one, its BatchNorm
statistics re-estimated as the trainer does. The model card gives the run's final metrics
(metrics.json's ``final`` block) beside real MNIST's, when the checkpoint is the run's last.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch

from models.dcgan import Generator
from trainers.checkpoint import read_meta, resolve_checkpoint
from trainers.export import check_out, config_lines, export_folder, metrics_table, parse_export_args, run_folder
from trainers.gan_sampling import load_generator_state

CARD_BATCH = 16   # images the card's example draws

CARD = """---
library_name: palgan
tags: [dcgan, mnist, gan, pytorch_model_hub_mixin]
---
# DCGAN generator for MNIST digits

A DCGAN generator: a latent `z` of {latent} standard-normal numbers goes through four transposed
convolutions (4x4 -> 8x8 -> 16x16 -> 32x32), a dilated convolution to 28x28 and a last
convolution with tanh, giving one 1 x 28 x 28 greyscale digit in [-1, 1] (BatchNorm and
LeakyReLU(0.2) after every layer but the last). Width `base_channels={b}`; {params:,} parameters in float32.
{which}

## Use it

With torch alone (no palgan), in this folder:

```python
import torch
generator = torch.export.load("model.pt2").module()
images = generator(torch.randn({n}, {latent}))   # ({n}, 1, 28, 28) in [-1, 1]
```

The same graph for onnxruntime: `onnxruntime.InferenceSession("model.onnx").run(None, {{"z": z}})`
with `z` a float32 array of shape (batch, {latent}). With palgan installed,
`Generator.from_pretrained(folder)` (`from models.dcgan import Generator`) rebuilds the module from
`config.json` and `model.safetensors`; `push_to_hub` publishes it. Any batch size works.

## Training

Trained by palgan (`python trainers/gan.py`) on the MNIST training set{subset}: {steps} iterations
({epochs} epochs) of {batch} images per process on {processes} process(es), Adam on D and G,
the non-saturating G loss. Settings: {settings}.

## Metrics

{metrics}
"""

FINAL_ROWS = (("FID vs MNIST test (classifier features)", "fid", "{:.3f}"),
              ("classifier score exp(E KL)", "classifier_score", "{:.3f}"),
              ("class-histogram entropy (nats, max 2.303)", "class_entropy", "{:.4f}"),
              ("smallest class fraction", "min_class_frac", "{:.4f}"),
              ("largest class fraction", "max_class_frac", "{:.4f}"))
SETTINGS = ("preset", "base_channels", "latent_dim", "batch_size", "lr", "beta1", "beta2", "ema_decay",
            "mixed_precision", "seed")


def metrics_text(metrics: dict | None, step: int) -> str:
    """The final metrics beside the real-data floor, or why there are none."""
    final = (metrics or {}).get("final")
    if not final or metrics.get("steps") != step:
        return ("This checkpoint was not scored at the end of a run. Score it with "
                "`python trainers/gan.py evaluate --checkpoint <checkpoint>` (FID, classifier score, class "
                "histogram, beside real MNIST).")
    rows = [("images scored", f"{int(final['n']):,}", f"{int(final['n_floor']):,}")]
    rows += [(name, fmt.format(final[k]), fmt.format(final[f"{k}_floor"])) for name, k, fmt in FINAL_ROWS]
    return ("Scored at the end of training with palgan's shipped MNIST classifier, beside the same numbers "
            "for real MNIST training images (the floor a perfect generator would reach):\n\n"
            + metrics_table(rows, ("metric", "this generator", "real MNIST")))


def model_card(generator: Generator, config: dict, metrics: dict | None, step: int) -> str:
    ema = config.get("ema_decay", 0) > 0
    which = (f"These are the weights of an exponential moving average of the trained generator (decay "
             f"{config['ema_decay']}), its BatchNorm statistics re-estimated, as the run sampled."
             if ema else "These are the trained generator's weights, its BatchNorm statistics as trained.")
    iters = (metrics or {}).get("iterations_per_epoch")
    subset = config.get("train_subset") or 0
    return CARD.format(
        latent=generator.latent_dim, b=config.get("base_channels", "?"), n=CARD_BATCH, which=which,
        params=sum(p.numel() for p in generator.parameters()), steps=step,
        epochs=f"{step / iters:.3g}" if iters else "?", batch=config.get("batch_size", "?"),
        processes=(metrics or {}).get("processes", "?"), subset=f" (its first {subset} images)" if subset else "",
        settings=config_lines(config, SETTINGS), metrics=metrics_text(metrics, step))


def export_generator(generator: Generator, config: dict, metrics: dict | None, step: int, out: Path) -> Path:
    """Export ``generator`` (any device; a CPU fp32 copy is exported) into ``out``."""
    model = Generator(generator.latent_dim, config.get("base_channels", 128))
    model.load_state_dict({k: v.detach().float().cpu() for k, v in copy.deepcopy(generator.state_dict()).items()})
    model.eval()
    example = torch.randn(2, model.latent_dim)
    return export_folder(model, {"latent_dim": model.latent_dim, "base_channels": config.get("base_channels", 128)},
                         example, "z", "images", model_card(model, config, metrics, step), out)


def run_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def export_main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_export_args(argv, "trainers/gan.py export", "a DCGAN checkpoint's generator")
    ckpt = resolve_checkpoint(Path(cfg.checkpoint))
    run_dir = run_folder(ckpt)
    out = check_out(Path(cfg.out) if cfg.out else run_dir / "model")
    generator, config = load_generator_state(ckpt)
    step = int(read_meta(ckpt)["step"])
    export_generator(generator, config, run_metrics(run_dir), step, out)
    print(f"exported the generator of {ckpt} (iteration {step}) -> {out}")
    return out


def artifact_metadata(metrics: dict) -> dict:
    """What the wandb artifact records beside the files: the iteration and the final scores."""
    final = metrics.get("final") or {}
    return {"step": metrics["steps"], "epochs": metrics["epochs_done"],
            **{f"final/{k}": final[k] for k in ("fid", "fid_floor", "classifier_score", "classifier_score_floor")
               if k in final}}
