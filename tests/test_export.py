"""`gan.py export` and `lstm.py export` on tiny runs: every format in the folder gives the eager model's
outputs (onnxruntime and the torch.export program within 1e-4 at batch 1 and 64, from_pretrained
exactly), the model card's own lines run in a fresh Python that cannot import palgan, and the run's
wandb model artifact, read back by wandb's own reader (``wandb leet inspect --json``), holds the
same folder with the aliases latest and best."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_usage_error, clean_env, run_script
from safetensors.torch import load_file

from models.dcgan import Generator
from models.lstm import LSTM
from trainers.checkpoint import read_meta
from trainers.cli import from_saved, run_cli
from trainers.export import FILES
from trainers.gan import load_generator
from trainers.gan import main as gan_main
from trainers.lstm import LSTMConfig, build_model, validation_set
from trainers.lstm import main as lstm_main

ort = pytest.importorskip("onnxruntime")
PALGAN_PACKAGES = ("models", "trainers", "tune", "data", "benchmarks")
TOLERANCE = 1e-4


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of a run's offline wandb log as wandb itself reads them."""
    [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def model_artifacts(run_dir: Path) -> list[dict]:
    return [r["artifact"] for r in wandb_records(run_dir) if r["type"] == "artifact" and r["artifact"]["type"] == "model"]


def card_code(folder: Path) -> str:
    """The first python block of the folder's model card."""
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert blocks, "the model card has no python block"
    return blocks[0]


FRESH = r"""
import sys
for name in {packages!r}:
    sys.modules[name] = None            # palgan's packages cannot be imported, editable install or not
import torch
torch.manual_seed(0)
namespace = {{}}
exec(compile(open(sys.argv[1]).read(), "README.md", "exec"), namespace)
torch.save({{k: v for k, v in namespace.items() if isinstance(v, torch.Tensor)}}, sys.argv[2])
print("PALGAN-MODULES", [n for n, m in list(sys.modules.items()) if m is not None and n.split(".")[0] in {packages!r}])
"""


def run_card(folder: Path, tmp_path: Path) -> tuple[str, dict]:
    """The card's lines in a fresh ``python -I`` in ``folder``, palgan unimportable; its stdout and tensors."""
    (tmp_path / "card.py").write_text(card_code(folder))
    (tmp_path / "fresh.py").write_text(FRESH.format(packages=PALGAN_PACKAGES))
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "fresh.py"), str(tmp_path / "card.py"),
                           str(tmp_path / "card_out.pt")], cwd=folder, capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PALGAN-MODULES []" in proc.stdout, proc.stdout
    return proc.stdout, torch.load(tmp_path / "card_out.pt")


def max_errors(folder: Path, eager, inputs: torch.Tensor, input_name: str) -> dict[str, float]:
    """Max |export - eager| of the torch.export program and of onnxruntime on ``inputs``."""
    with torch.no_grad():
        ref = eager(inputs).float()
        program = torch.export.load(folder / "model.pt2").module()
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        onnx_out = torch.from_numpy(session.run(None, {input_name: inputs.numpy()})[0])
        return {"pt2": (program(inputs) - ref).abs().max().item(), "onnx": (onnx_out - ref).abs().max().item()}


# --- the GAN ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A tiny cpu-demo run (EMA generator, bf16 training) with wandb offline, then `export` on it."""
    root = tmp_path_factory.mktemp("gan")
    proc = run_script(["trainers/gan.py", "--preset", "cpu-demo", "--base-channels", "4", "--batch-size", "32",
                       "--train-subset", "256", "--epochs", "1", "--stages", "0,1", "--stage-samples", "200",
                       "--eval-samples", "400", "--no-progress", "--out-dir", root, "--run-name", "g"],
                      WANDB_DATA_DIR=str(root / "wandb-data"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(["trainers/gan.py", "export", "--checkpoint", root / "g", "--out", root / "exported"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "g", root / "exported"


def test_gan_export_matches_the_eager_generator_in_every_format(gan_run):
    run, folder = gan_run
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    eager, cfg = load_generator(run)   # the EMA generator, BatchNorm re-estimated, as `sample` uses
    assert cfg.optim.ema_decay > 0
    assert json.loads((folder / "config.json").read_text()) == {"latent_dim": 100, "base_channels": 4}
    loaded = Generator.from_pretrained(folder)
    for batch in (1, 64):
        z = torch.randn(batch, 100, generator=torch.Generator().manual_seed(batch))
        errors = max_errors(folder, eager, z, "z")
        assert max(errors.values()) < TOLERANCE, (batch, errors)
        with torch.no_grad():
            assert torch.equal(loaded(z), eager(z))


def test_gan_model_card_runs_without_palgan_and_reports_the_final_metrics(gan_run, tmp_path):
    run, folder = gan_run
    _, tensors = run_card(folder, tmp_path)
    eager, _ = load_generator(run)
    torch.manual_seed(0)
    z = torch.randn(*tensors["images"].shape[:1], 100)   # the card draws its z right after the seed
    with torch.no_grad():
        assert (tensors["images"] - eager(z)).abs().max().item() < TOLERANCE
    assert tensors["images"].shape[1:] == (1, 28, 28)
    final = json.loads((run / "metrics.json").read_text())["final"]
    card = (folder / "README.md").read_text()
    for key in ("fid", "fid_floor", "classifier_score", "classifier_score_floor"):
        assert f"{final[key]:.3f}" in card, key


def test_gan_run_logs_its_export_as_a_wandb_model_artifact(gan_run):
    run, folder = gan_run
    [artifact] = model_artifacts(run)
    [offline] = run.glob("wandb/offline-run-*")   # offline-run-<time>-<run id>
    assert artifact["name"] == f"model-{offline.name.rsplit('-', 1)[1]}"
    assert sorted(artifact["aliases"]) == ["best", "latest"]
    assert json.loads(artifact["metadata"])["step"] == json.loads((run / "metrics.json").read_text())["steps"]
    staged = {entry["path"]: Path(entry["local_path"]) for entry in artifact["manifest"]["contents"]}
    assert sorted(staged) == sorted(FILES)   # staged by wandb for `wandb sync`, the files of an export
    weights, exported = load_file(staged["model.safetensors"]), load_file(folder / "model.safetensors")
    assert weights.keys() == exported.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], exported[key], rtol=0, atol=1e-6)
    assert staged["config.json"].read_text() == (folder / "config.json").read_text()


def usage_error(main, argv, capsys, *needles) -> None:
    """``main(argv)`` as the command line runs it: exit code 2 and one line on stderr naming ``needles``."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_gan_export_bad_input_is_one_line_and_exit_2(gan_run, tmp_path, capsys):
    run, _ = gan_run
    usage_error(gan_main, ["export", "--checkpoint", tmp_path / "none"], capsys, "does not exist")
    (tmp_path / "file").write_text("x")
    usage_error(gan_main, ["export", "--checkpoint", run, "--out", tmp_path / "file"], capsys, "--out", "is a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    usage_error(gan_main, ["export", "--checkpoint", run, "--out", tmp_path / "mine"], capsys, "--out", "other files")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    usage_error(gan_main, ["export"], capsys, "--checkpoint")
    assert_usage_error(run_script(["trainers/gan.py", "export", "--checkpoint", tmp_path / "none"]), "does not exist")


# --- the LSTM -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    """A tiny LSTM run with wandb offline (a validation every 20 steps), then `export` on it."""
    root = tmp_path_factory.mktemp("lstm")
    proc = run_script(["trainers/lstm.py", "--hidden-dim", "16", "--steps", "60", "--eval-every", "20",
                       "--val-size", "200", "--no-progress", "--out-dir", root, "--run-name", "l"],
                      WANDB_DATA_DIR=str(root / "wandb-data"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(["trainers/lstm.py", "export", "--checkpoint", root / "l", "--out", root / "exported"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "l", root / "exported"


def trained_lstm(run: Path):
    """palgan's model of the run's best checkpoint, with the trainer's backend (script), and its config."""
    [best] = (run / "checkpoints" / "best").iterdir()
    cfg = from_saved(LSTMConfig, read_meta(best)["config"])
    model = build_model(cfg).eval()
    model.load_state_dict(load_file(best / "model.safetensors"))
    return model, cfg, best


def test_lstm_export_of_the_best_checkpoint_matches_the_eager_model(lstm_run):
    run, folder = lstm_run
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    model, cfg, best = trained_lstm(run)
    assert model.backend == "script"
    assert json.loads((folder / "config.json").read_text()) == {"input_dim": 10, "hidden_dim": 16, "output_dim": 10}
    loaded = LSTM.from_pretrained(folder, backend="eager")
    x_val = validation_set(cfg).tensors[0]   # (200, T-1, 10) one-hot palindromes
    for batch in (1, 64):
        x = x_val[:batch]
        errors = max_errors(folder, model, x, "x")
        assert max(errors.values()) < TOLERANCE, (batch, errors)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    meta = read_meta(best)
    val = next(r for r in meta["extra"]["history"] if r["step"] == meta["step"] and "val/acc" in r)
    assert f"{val['val/acc']:.4f}" in (folder / "README.md").read_text()


def test_lstm_model_card_runs_without_palgan(lstm_run, tmp_path):
    run, folder = lstm_run
    out, _ = run_card(folder, tmp_path)
    model, _, _ = trained_lstm(run)
    x = torch.nn.functional.one_hot(torch.tensor([[3, 1, 4, 1]]), 10).float()   # the card's palindrome, T=5
    with torch.no_grad():
        assert f"tensor([{model(x).argmax(1).item()}])" in out


def test_lstm_logs_a_model_artifact_each_time_its_best_checkpoint_changes_and_every_format_at_the_end(lstm_run):
    """Each new best: a version with config.json and model.safetensors (milliseconds); at the end of the
    run, one more version of the best checkpoint with the graphs and the card (seconds, once)."""
    run, _ = lstm_run
    history = [r["history"]["item"] for r in wandb_records(run) if r["type"] == "history"]
    val = [(row["_step"], row["val/acc"]) for row in history if "val/acc" in row]
    assert [s for s, _ in val] == [20, 40, 60]
    improved = [s for k, (s, acc) in enumerate(val) if all(acc > a for _, a in val[:k])]
    artifacts = model_artifacts(run)
    assert [json.loads(a["metadata"])["step"] for a in artifacts] == improved + improved[-1:]
    for version in artifacts[:-1]:
        assert {"config.json", "model.safetensors"} <= {e["path"] for e in version["manifest"]["contents"]}
    assert len({a["name"] for a in artifacts}) == 1   # versions of one artifact
    assert all(sorted(a["aliases"]) == ["best", "latest"] for a in artifacts)
    staged = {e["path"]: Path(e["local_path"]) for e in artifacts[-1]["manifest"]["contents"]}
    assert sorted(staged) == sorted(FILES)
    model, _, _ = trained_lstm(run)   # the last version holds the best checkpoint's weights
    weights = load_file(staged["model.safetensors"])
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key


def test_lstm_export_bad_input_is_one_line_and_exit_2(lstm_run, tmp_path, capsys):
    run, _ = lstm_run
    usage_error(lstm_main, ["export", "--checkpoint", tmp_path / "none"], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    usage_error(lstm_main, ["export", "--checkpoint", tmp_path / "empty"], capsys, "no checkpoint")
    (tmp_path / "file").write_text("x")
    usage_error(lstm_main, ["export", "--checkpoint", run, "--out", tmp_path / "file"], capsys, "--out", "is a file")
    [best] = (run / "checkpoints" / "best").iterdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "palgan.json").write_text((best / "palgan.json").read_text())
    usage_error(lstm_main, ["export", "--checkpoint", tmp_path / "broken"], capsys, "cannot be loaded")
    assert not (run / "model").exists()   # nothing was written in the run
