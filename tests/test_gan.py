"""The DCGAN and its trainer: shapes against SPEC, the loop against a plain PyTorch loop,
multi-process BatchNorm against BatchNorm on the whole batch, files on disk, resume, bad input."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from benchmarks.gan_speed import plain_train
from conftest import ROOT, assert_usage_error, clean_env, free_port, run_script, signal_when
from data import DataError
from models.dcgan import Discriminator, Generator
from trainers.cli import UsageError, build, run_cli
from trainers.gan import (GANConfig, epoch_batches, fixed_noise, load_generator, load_train_images, main,
                          make_config, parse_train_args, train)
from trainers.gan_plots import plot_losses, plot_stages
from trainers.gan_sampling import BN_CALIBRATION, calibrate_batchnorm, generate, save_grid
from wandb_files import read_offline_run

# a few seconds per run: b=4, 512 images, batches of 32 -> 16 iterations per epoch
TINY = dict(preset="cpu-demo", base_channels=4, batch_size=32, train_subset=512, epochs=2, stages="0,1,2",
            mixed_precision="no", wandb=False, progress=False, eval_metrics=False, checkpoint_every=8, log_every=4)
TINY_FLAGS = ["--preset", "cpu-demo", "--base-channels", "4", "--batch-size", "32", "--train-subset", "512",
              "--mixed-precision", "no", "--no-progress", "--no-eval-metrics", "--log-every", "4"]


def same_pixels(a: Path, b: Path) -> bool:
    """Two PNGs show the same picture (to rounding in the last colour bit)."""
    x, y = mpimg.imread(a), mpimg.imread(b)
    return x.shape == y.shape and float(np.abs(x - y).mean()) < 1e-4


def tiny(tmp_path, **kw) -> GANConfig:
    return make_config(**{**TINY, "out_dir": str(tmp_path), **kw})


# --- the models ----------------------------------------------------------------------------------

def test_generator_follows_spec_shapes_and_range():
    b = 3
    G = Generator(100, b)
    x, shapes = torch.randn(5, 100, 1, 1), []
    for layer in G.net:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(8 * b, 4, 4), (4 * b, 8, 8), (2 * b, 16, 16), (b, 32, 32), (b, 28, 28), (1, 28, 28)]
    dilated = [m for m in G.modules() if isinstance(m, nn.Conv2d) and m.dilation == (2, 2)]
    assert len(dilated) == 1 and dilated[0].in_channels == dilated[0].out_channels == b  # the fixed bug
    out = G(torch.randn(7, 100))
    assert out.shape == (7, 1, 28, 28) and out.abs().max() <= 1


def test_discriminator_returns_one_logit_per_image_and_uses_dcgan_init():
    b = 4
    D = Discriminator(b)
    x, shapes = torch.randn(6, 1, 28, 28), []
    for layer in D.net:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(b, 14, 14), (2 * b, 7, 7), (4 * b, 3, 3), (8 * b, 1, 1), (1, 1, 1)]
    assert D(torch.randn(6, 1, 28, 28)).shape == (6,)
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())   # logits, for BCEWithLogits
    big = Generator(100, 32).net[0].weight   # 100 x 256 x 4 x 4 draws of N(0, 0.02)
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    bn = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)][-1]   # gamma ~ N(1, 0.02), beta = 0
    gamma = bn.weight
    assert abs(gamma.mean().item() - 1) < 5 * 0.02 / gamma.numel() ** 0.5   # 5 standard errors of the mean
    assert 0.01 < gamma.std().item() < 0.03 and bn.bias.abs().max() == 0   # not BatchNorm's default of ones


def test_global_batchnorm_over_two_processes_equals_batchnorm_on_the_whole_batch():
    import torch.multiprocessing as mp
    from gan_dist_worker import global_bn_rank
    x, w = torch.randn(8, 3, 5, 5) * 3 + 1, torch.randn(8, 3, 5, 5)
    weight, bias = torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.1, -0.2, 0.3])
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    (y_ref * w).sum().backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=global_bn_rank, args=(r, 2, port, x, w, weight, bias, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted([queue.get(timeout=120) for _ in procs], key=lambda t: t[0])
    for p in procs:
        p.join(30)
    got = [[torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in g] for g in got]
    y = torch.cat([g[1] for g in got])
    gx = torch.cat([g[2] for g in got])
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(gx, xr.grad, atol=1e-5)
    for _, _, _, gw, rm, rv in got:   # equal on both ranks, equal to the single-process BatchNorm
        assert torch.allclose(gw, ref.weight.grad, atol=1e-4)
        assert torch.allclose(rm, ref.running_mean, atol=1e-5) and torch.allclose(rv, ref.running_var, atol=1e-5)


# --- the data ------------------------------------------------------------------------------------

def test_epoch_shards_are_disjoint_reproducible_and_cover_the_epoch():
    cfg = build(GANConfig, batch_size=10, seed=3)
    a0, a1 = epoch_batches(cfg, 100, 0, 2, 1), epoch_batches(cfg, 100, 1, 2, 1)
    assert a0.shape == a1.shape == (5, 10)
    assert set(a0.flatten().tolist()).isdisjoint(a1.flatten().tolist())
    assert sorted(a0.flatten().tolist() + a1.flatten().tolist()) == list(range(100))
    assert torch.equal(a0, epoch_batches(cfg, 100, 0, 2, 1))
    assert not torch.equal(a0, epoch_batches(cfg, 100, 0, 2, 2))          # a new order each epoch
    images = load_train_images(build(GANConfig, train_subset=100))
    assert images.shape == (100, 1, 28, 28) and images.min() == -1 and images.max() == 1


# --- the loop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision,steps,tol", [("no", 20, 1e-6), ("bf16", 6, 1e-6)])
def test_trainer_loop_matches_a_plain_pytorch_loop(tmp_path, precision, steps, tol):
    cfg = tiny(tmp_path, run_name="ref", max_steps=steps, ema_decay=0.0, stages="0", mixed_precision=precision)
    train(cfg)
    G, D, _ = plain_train(cfg, load_train_images(cfg), steps, fused_adam=True)
    ckpt = tmp_path / "ref" / "checkpoints" / f"step_{steps:08d}"
    for model, file in ((G, "model.safetensors"), (D, "model_1.safetensors")):
        saved = load_file(ckpt / file)
        for k, v in model.state_dict().items():
            assert torch.allclose(saved[k], v, rtol=10 * tol, atol=tol), (file, k, (saved[k] - v).abs().max())


def test_the_g_step_computes_no_gradient_for_d(tmp_path, monkeypatch):
    """D's weight gradients are computed once per iteration, in the D step: the G step runs with D
    frozen (its weight gradients would be thrown away by the next D step, and all-reduced under DDP
    first). The plain loop of pytorch/examples computes them twice, which the same hooks see."""
    import trainers.gan as gan
    counts = {"trainer": 0, "plain": 0}
    build = gan.build_models

    def counted(who):
        def build_models(cfg):
            G, D = build(cfg)
            for p in D.parameters():
                p.register_hook(lambda grad: counts.__setitem__(who, counts[who] + 1))
            return G, D
        return build_models
    steps, n = 5, len(list(Discriminator(base_channels=4).parameters()))
    monkeypatch.setattr(gan, "build_models", counted("trainer"))
    cfg = tiny(tmp_path, run_name="frozen", max_steps=steps, ema_decay=0.0, stages="0")
    train(cfg)
    import benchmarks.gan_speed as gan_speed
    monkeypatch.setattr(gan_speed, "build_models", counted("plain"))
    plain_train(cfg, load_train_images(cfg), steps)
    assert counts == {"trainer": steps * n, "plain": 2 * steps * n}, counts


def test_the_ema_follows_its_warm_up_formula():
    from trainers.gan import ema_of, ema_step
    torch.manual_seed(0)
    G = Generator(base_channels=4)
    ema, decay = ema_of(G), 0.75
    reference = [p.detach().double().clone() for p in G.parameters()]
    for t in range(1, 31):                       # decay_t: 2/11, 3/12, ..., capped at 0.75 from t=26
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p))
        ema_step(ema, G, decay, t)
        d = min(decay, (1 + t) / (10 + t))
        reference = [r + (1 - d) * (p.detach().double() - r) for r, p in zip(reference, G.parameters())]
    for r, a in zip(reference, ema.module.parameters()):
        assert torch.allclose(a.double(), r, atol=1e-5), (a.double() - r).abs().max()
    assert not torch.equal(next(ema.module.parameters()), next(G.parameters()))


def test_tiny_run_writes_every_file_and_the_offline_wandb_run(tmp_path):
    proc = run_script(["trainers/gan.py", *TINY_FLAGS, "--epochs", "3", "--stages", "0,1,2,3", "--lr", "1e-3",
                       "--checkpoint-every", "10", "--keep-checkpoints", "2", "--out-dir", tmp_path,
                       "--run-name", "e2e"], WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "e2e"
    grids = [mpimg.imread(run / "samples" / f"epoch_{e:03d}.png") for e in range(4)]
    assert all(g.shape[:2] == (8 * 30 + 2, 8 * 30 + 2) for g in grids)   # 8 x 8 images of 28 px + padding
    for a, b in zip(grids, grids[1:]):                                    # the grids change across stages
        assert np.abs(a - b).max() > 0.1 and np.abs(a - b).mean() > 1e-3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 48 and metrics["iterations_per_epoch"] == 16
    assert metrics["skipped_steps_d"] == metrics["skipped_steps_g"] == 0
    assert set(metrics["stages"]) == {"0", "1", "2", "3"}
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000040", "step_00000048"]                   # the last 2 of 10, 16, 20, ...
    meta = json.loads((run / "checkpoints" / "step_00000048" / "palgan.json").read_text())
    assert len(meta["extra"]["history"]["loss_d"]) == 48                  # per-iteration losses kept

    # the figures show this run, drawn again here from the saved generator, history and grids:
    # the final grid is the last EMA generator (BatchNorm re-estimated) on the fixed noise
    cfg = make_config(**{**TINY, "epochs": 3, "stages": "0,1,2,3", "lr": 1e-3, "out_dir": str(tmp_path)})
    generator, _ = load_generator(run / "checkpoints" / "step_00000048")
    generator = calibrate_batchnorm(generator, cfg.run.seed, *BN_CALIBRATION)
    with torch.no_grad():
        save_grid(generator(fixed_noise(cfg)), tmp_path / "final.png")
    assert same_pixels(run / "samples" / "final.png", tmp_path / "final.png")
    plot_losses(meta["extra"]["history"], 16, tmp_path / "losses.png")
    assert same_pixels(run / "figures" / "losses.png", tmp_path / "losses.png")
    grids = [(f"epoch {e}", run / "samples" / f"epoch_{e:03d}.png") for e in range(4)]
    plot_stages(grids, tmp_path / "stages.png", "the fixed-noise grid across training")
    assert same_pixels(run / "figures" / "stages.png", tmp_path / "stages.png")
    plot_stages([("start: epoch 0", grids[0][1]), ("middle: epoch 2", grids[2][1]),
                 ("end: iteration 48", run / "samples" / "final.png")], tmp_path / "three_panel.png",
                "start, middle and end of training")
    assert same_pixels(run / "figures" / "three_panel.png", tmp_path / "three_panel.png")

    [wandb_file] = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    history = read_offline_run(wandb_file)["history"]
    steps = [row["_step"] for row in history]
    assert steps == sorted(steps)
    scalars = [row for row in history if "train/loss_d" in row]
    assert len(scalars) >= 12 and all(np.isfinite(r["train/loss_g"]) for r in scalars)
    assert sum("samples/grid/_type" in row for row in history) == 4       # one grid per stage
    assert any("figures/losses/_type" in row and "figures/three_panel/_type" in row for row in history)

    # sample: a tensor in [-1, 1], and a PNG grid, from the run folder
    out = tmp_path / "s.pt"
    assert run_cli(main, ["sample", "--checkpoint", str(run), "--n", "10", "--out", str(out)]) is None
    images = torch.load(out)
    assert images.shape == (10, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    generator, cfg = load_generator(run / "checkpoints")
    assert torch.equal(images, generate(generator, 10, seed=0)) and cfg.model.base_channels == 4
    run_cli(main, ["sample", "--checkpoint", str(run / "checkpoints" / "step_00000040"), "--n", "5",
                   "--out", str(tmp_path / "s.png")])
    assert mpimg.imread(tmp_path / "s.png").shape[:2] == (2 * 30 + 2, 3 * 30 + 2)   # 5 images: 2 rows of 3


def final_state(run: Path) -> dict:
    last = sorted((run / "checkpoints").iterdir())[-1]
    ema = torch.load(last / "custom_checkpoint_0.pkl", weights_only=True)
    return {**load_file(last / "model.safetensors"), **{f"D.{k}": v for k, v in load_file(last / "model_1.safetensors").items()},
            **{f"ema.{k}": v for k, v in ema.items()}}


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    flags = [*TINY_FLAGS, "--epochs", "4", "--stages", "0,2,4", "--checkpoint-every", "20", "--no-wandb",
             "--out-dir", tmp_path]
    train(make_config(**{**TINY, "epochs": 4, "stages": "0,2,4", "checkpoint_every": 20,
                         "out_dir": str(tmp_path), "run_name": "ref"}))
    child = subprocess.Popen([sys.executable, "trainers/gan.py", *map(str, flags), "--run-name", "cut"], cwd=ROOT,
                             env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "cut" / "checkpoints" / "step_00000020"
    signal_when(child, first.exists, signal.SIGKILL, f"the first checkpoint {first.name} to appear", timeout=120)
    child.communicate()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut" / "metrics.json").exists()

    train(make_config(**{**TINY, "epochs": 4, "stages": "0,2,4", "checkpoint_every": 20,
                         "out_dir": str(tmp_path), "run_name": "cut", "resume": True}))
    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("ref", "cut"))
    assert mb["steps"] == ma["steps"] == 64 and mb["last_epoch/loss_d"] == ma["last_epoch/loss_d"]


def test_resume_under_another_number_of_processes_keeps_the_global_batch_or_is_one_line(tmp_path):
    """A checkpoint from 2 processes x batch 32 resumed by 1 process: an explicit --batch-size that
    changes the global batch is refused before anything loads or trains (one line, exit 2, the folder as
    it was); with the same flags the run continues at batch 64, the same 8 iterations per epoch, says so
    at start-up and records both process counts."""
    train(tiny(tmp_path, run_name="two", max_steps=8, stages="0"))
    meta_path = tmp_path / "two" / "checkpoints" / "step_00000008" / "palgan.json"
    meta = json.loads(meta_path.read_text())
    assert meta["processes"] == 1
    meta_path.write_text(json.dumps({**meta, "processes": 2}))      # as `accelerate launch` with 2 writes it
    before = {p: p.read_bytes() for p in (tmp_path / "two").rglob("*") if p.is_file()}
    args = ["trainers/gan.py", *TINY_FLAGS, "--no-wandb", "--out-dir", tmp_path, "--run-name", "two", "--resume"]
    proc = run_script([*args, "--max-steps", "16", "--batch-size", "48"])
    assert_usage_error(proc, "step_00000008", "--batch-size 48 on 1 process(es) is a global batch of 48, not the 64")
    assert {p: p.read_bytes() for p in (tmp_path / "two").rglob("*") if p.is_file()} == before
    done = run_script([*args, "--max-steps", "16"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "two: continuing on 1 process(es) instead of 2: --batch-size 64 per process keeps the global batch " \
           "of 64" in done.stdout, done.stdout[-2000:]
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m["processes"], m["resumed_from_processes"], m["config"]["batch_size"], m["steps"]) == (1, 2, 64, 16)
    assert m["iterations_per_epoch"] == 8


# --- presets -------------------------------------------------------------------------------------

def test_presets_and_explicit_flags(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = parse_train_args(["--epochs", "2"])
    assert "preset auto -> cpu-demo" in capsys.readouterr().out
    assert cfg.preset == "cpu-demo" and cfg.optim.epochs == 2 and cfg.model.base_channels == 16   # flag wins, rest preset
    paper = parse_train_args(["--preset", "paper"])
    assert (paper.model.base_channels, paper.optim.epochs, paper.optim.batch_size, paper.optim.lr, paper.optim.beta1,
            paper.model.latent_dim) == \
        (128, 50, 128, 2e-4, 0.5, 100)
    assert paper.stage_list() == [0, 1, 5, 10, 20, 30, 40, 50]


def test_preset_auto_and_channels_last_end_to_end(tmp_path):
    """`python trainers/gan.py` without --preset, as users run it, with --channels-last: the preset
    this machine resolves to, every other setting from it, and the same training as the default
    memory format."""
    flags = [f for f in TINY_FLAGS if f not in ("--preset", "cpu-demo")]
    proc = run_script(["trainers/gan.py", *flags, "--max-steps", "8", "--stages", "0", "--channels-last",
                       "--no-wandb", "--out-dir", tmp_path, "--run-name", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "paper" if torch.cuda.is_available() else "cpu-demo"   # SPEC: paper on CUDA, else cpu-demo
    assert f"preset auto -> {expected}" in proc.stdout
    ref = train(make_config(expected, base_channels=4, batch_size=32, train_subset=512, mixed_precision="no",
                            eval_metrics=False, log_every=4, max_steps=8, stages="0", wandb=False, progress=False,
                            out_dir=str(tmp_path), run_name="ref"))   # the same flags, the preset named
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert auto["finished"] and auto["steps"] == ref["steps"] == 8 and auto["preset"] == expected
    differ = {"run_name", "channels_last", "preset", "num_threads"}
    assert {k: v for k, v in auto["config"].items() if k not in differ} == \
        {k: v for k, v in ref["config"].items() if k not in differ}
    assert auto["config"]["channels_last"] and not ref["config"]["channels_last"]
    # NHWC convolutions sum in another order: the first iteration agrees to float rounding, and
    # Adam's sign-like steps let the rest drift by a few 1e-4 (measured <= 2e-4 over 8 iterations)
    a, b = (json.loads(sorted((tmp_path / r / "checkpoints").iterdir())[-1].joinpath("palgan.json").read_text())
            ["extra"]["history"] for r in ("auto", "ref"))
    for key in ("loss_d", "loss_g", "d_x", "d_g_z"):
        assert len(a[key]) == len(b[key]) == 8
        assert abs(a[key][0] - b[key][0]) < 1e-5, key
        assert max(abs(x - y) for x, y in zip(a[key], b[key])) < 2e-3, (key, a[key], b[key])


# --- bad input -----------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--preset", "huge"], "--preset"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-64"], "--batch-size"),
    (["--batch-size", "inf"], "--batch-size"),
    (["--base-channels", "0"], "--base-channels"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--stages", "1,x"], "--stages"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--resume"], "no checkpoint"),
    (["--batch-size", "100", "--train-subset", "50"], "--batch-size"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_give_one_line_and_exit_2(flags, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*flags, "--out-dir", str(tmp_path), "--no-wandb", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())                                  # nothing was written


def test_corrupt_mnist_file_is_named_and_nothing_is_written(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", raw)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes((ROOT / "data" / "MNIST" / "raw" / gz.name).read_bytes()[:100_000])   # truncated
    with pytest.raises(DataError, match="corrupt") as err:
        train(make_config(**{**TINY, "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "runs")}))
    assert str(gz) in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_bad_checkpoints_for_sample_and_resume_are_reported_and_left_untouched(tmp_path, capsys):
    train(tiny(tmp_path, run_name="c", max_steps=8, stages="0"))
    run = tmp_path / "c"
    ckpt = run / "checkpoints" / "step_00000008"
    out = tmp_path / "keep.pt"
    out.write_bytes(b"precious")
    for argv, needle in ((["--checkpoint", str(tmp_path / "missing")], "does not exist"),
                         (["--checkpoint", str(tmp_path)], "no checkpoint found"),
                         (["--checkpoint", str(run), "--n", "0"], "--n"),
                         (["--checkpoint", str(run), "--out", str(tmp_path / "x.jpg")], "--out")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, ["sample", *argv, "--out", str(out)] if "--out" not in argv else ["sample", *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(b"not a tensor file")
    (ckpt / "model.safetensors").write_bytes(b"not a tensor file")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    metrics_before = (run / "metrics.json").read_bytes()
    with pytest.raises(SystemExit):
        run_cli(main, ["sample", "--checkpoint", str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be loaded" in err and "step_00000008" in err, err
    assert out.read_bytes() == b"precious"
    with pytest.raises(SystemExit):
        run_cli(main, [*TINY_FLAGS, "--no-wandb", "--out-dir", str(tmp_path), "--run-name", "c", "--resume",
                       "--max-steps", "16"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_00000008" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert (run / "metrics.json").read_bytes() == metrics_before
    (ckpt / "palgan.json").write_text("{")
    with pytest.raises(UsageError, match="corrupt"):
        load_generator(run)


def test_existing_run_is_not_overwritten_and_nan_loss_is_a_usage_error(tmp_path):
    train(tiny(tmp_path, run_name="r", max_steps=4, stages="0"))
    with pytest.raises(UsageError, match="--resume"):
        train(tiny(tmp_path, run_name="r", max_steps=4, stages="0"))
    saved = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file() and "wandb" not in p.parts}
    with pytest.raises(UsageError, match="--lr"):   # resumed with an absurd lr: the loss becomes NaN
        train(tiny(tmp_path, run_name="r", max_steps=12, stages="0", lr=1e38, beta1=0.0, resume=True))
    assert all(p.read_bytes() == blob for p, blob in saved.items())     # nothing saved was lost
