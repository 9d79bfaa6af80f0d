"""GAN evaluation and latent walks: SLERP, the metrics against independent oracles, their cache,
the CLIs end to end."""
import json
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.transforms.functional import gaussian_blur

import trainers.gan as gan
import trainers.gan_metrics as gm
import trainers.gan_walks as gw
from conftest import assert_usage_error, run_script
from data.mnist import load_mnist, to_unit_range
from trainers.cli import UsageError, run_cli
from trainers.gan_evaluate import evaluate_main
from trainers.gan_interpolate import interpolate_main
from trainers.gan_sampling import BN_CALIBRATION, BN_STREAM, calibrate_batchnorm, load_generator_state, noise
from wandb_files import read_offline_run

# --- SLERP ------------------------------------------------------------------------------------

def angle(a, b):
    """The angle between two vectors, from the parts of b along and across a."""
    along = (a @ b) / a.norm()
    across = (b.norm() ** 2 - along ** 2).clamp_min(0).sqrt()
    return torch.atan2(across, along)


def test_slerp_hits_both_endpoints_and_moves_at_constant_angular_speed():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(100, generator=g, dtype=torch.float64), 3 * torch.randn(100, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    path = gw.slerp(z1, z2, t)
    assert torch.allclose(path[0], z1, atol=1e-12) and torch.allclose(path[-1], z2, atol=1e-12)
    omega = angle(z1, z2)
    for k in range(9):   # the angle to z1 grows linearly, t * omega, and so does the norm
        assert math.isclose(float(angle(z1, path[k])), float(t[k] * omega), abs_tol=1e-9)
        assert math.isclose(float(path[k].norm()), float((1 - t[k]) * z1.norm() + t[k] * z2.norm()), rel_tol=1e-9)
    # the path stays in the plane of z1 and z2 (least squares residual ~ 0)
    basis = torch.stack([z1, z2], 1)
    coef = torch.linalg.lstsq(basis, path.T).solution
    assert torch.allclose(basis @ coef, path.T, atol=1e-9)


def test_slerp_keeps_the_norm_where_linear_cuts_the_corner():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    z2 = z2 * z1.norm() / z2.norm()                               # same radius r
    t = torch.linspace(0, 1, 9)
    r = z1.norm()
    assert torch.allclose(gw.slerp(z1, z2, t).norm(dim=1), r.expand(9), rtol=1e-5)
    omega = angle(z1.double(), z2.double())
    # the linear midpoint lies at r cos(omega / 2) from the origin
    assert math.isclose(float(gw.lerp(z1, z2, t)[4].norm()), float(r * torch.cos(omega / 2)), rel_tol=1e-5)


@pytest.mark.parametrize("scale", [2.0, -1.0, -0.5, 1.0])
def test_parallel_and_antiparallel_inputs_fall_back_to_linear_without_nan(scale):
    z1 = torch.randn(100, generator=torch.Generator().manual_seed(2))
    z2 = scale * z1
    t = torch.linspace(0, 1, 9)
    path = gw.slerp(z1, z2, t)
    assert torch.isfinite(path).all()
    assert torch.allclose(path, gw.lerp(z1, z2, t))
    nearly = gw.slerp(z1, z1 + 1e-4 * torch.randn(100, generator=torch.Generator().manual_seed(3)), t)
    assert torch.isfinite(nearly).all()


def test_pairs_parse_or_fail_with_one_line():
    assert gw.parse_pairs("8-3,1-7, 0-6") == [(8, 3), (1, 7), (0, 6)]
    for bad in ("83", "8-", "10-3", "a-b", "8-3-1", "8-3,"):
        with pytest.raises(UsageError, match="--pairs"):
            gw.parse_pairs(bad)


# --- metrics against independent oracles --------------------------------------------------------

def test_classifier_score_and_entropy_match_scipy():
    logits = 3 * torch.randn(500, 10, generator=torch.Generator().manual_seed(4))
    p = torch.softmax(logits.double(), 1).numpy()
    marginal = p.mean(0)
    expected = math.exp(np.mean([scipy.stats.entropy(row, marginal) for row in p]))
    assert math.isclose(gm.classifier_score(torch.log_softmax(logits, 1)), expected, rel_tol=1e-5)
    hist = gm.class_histogram(logits.argmax(1))
    assert math.isclose(gm.histogram_entropy(hist), scipy.stats.entropy(hist.numpy()), rel_tol=1e-9)
    # the two ends of the scale: confident and uniform over 10 classes -> 10; one class -> 1
    confident = torch.log_softmax(40 * torch.eye(10).repeat(30, 1), 1)
    assert math.isclose(gm.classifier_score(confident), 10.0, rel_tol=1e-6)
    assert math.isclose(gm.classifier_score(confident[::10]), 1.0, rel_tol=1e-6)


@pytest.fixture(scope="module")
def scorer():
    return gm.scorer_for("cpu")


@pytest.fixture(scope="module")
def real_images():
    images, labels = load_mnist("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(5))[:2000]
    return to_unit_range(images[pick]), labels[pick]


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance written from the formula with scipy's sqrtm (the oracle)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# some penultimate ReLU units never fire, so the covariances are singular and sqrtm warns; the
# result still matches to 1e-3
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_orders_real_blurred_noise_and_agrees_with_scipy(scorer, real_images):
    images, labels = real_images
    blurred = gaussian_blur(images, kernel_size=7, sigma=2.0)
    noise = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(6)) * 2 - 1
    real_m, blur_m, noise_m = (scorer.score_images(x) for x in (images, blurred, noise))
    assert real_m["fid"] < blur_m["fid"] < noise_m["fid"]
    assert noise_m["fid"] > 10 * real_m["fid"]
    # noise collapses onto few classes; real digits spread over all ten
    assert noise_m["max_class_frac"] > 0.5 and noise_m["class_entropy"] < 1.0
    assert real_m["min_class_frac"] > 0.07 and real_m["class_entropy"] > 2.28
    assert real_m["classifier_score"] > 9.5 > blur_m["classifier_score"] and noise_m["classifier_score"] < 3
    # torchmetrics' FID on our features == the formula with scipy's matrix square root
    test_features, _ = scorer.features_and_log_probs(to_unit_range(load_mnist("test")[0]))
    # the reference statistics the scorer holds (read from the cache when it was there) are
    # exactly those of the test features computed now
    fresh = FrechetInceptionDistance(feature=gm.FeatureInput(), reset_real_features=False)
    fresh.update(test_features, real=True)
    for name in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
        assert torch.equal(getattr(fresh, name), getattr(scorer.fid, name)), name
    blur_features, _ = scorer.features_and_log_probs(blurred)
    assert math.isclose(blur_m["fid"], scipy_fid(blur_features.numpy(), test_features.numpy()), rel_tol=1e-3)
    # the histogram is of the classifier's labels, which are right on real digits
    pred, _, _ = scorer.classify(images)
    assert (pred == labels).float().mean() > 0.99


def test_floor_is_ten_thousand_real_training_images(scorer):
    floor = scorer.floor()
    assert floor["n"] == 10_000 and 0 < floor["fid"] < 4 and floor["classifier_score"] > 9.5
    assert abs(sum(floor["class_hist"]) - 1) < 1e-3
    # the floor's images are the fixed random subset: their labels' histogram is the classifier's, nearly
    _, labels = load_mnist("train")
    truth = gm.class_histogram(labels[gm.floor_indices()])
    assert max(abs(a - b) for a, b in zip(floor["class_hist"], truth.tolist())) < 0.005


# --- the cache of the classifier's outputs on real images ----------------------------------------

SMALL_FLOOR = 300   # a floor this size exercises the same cache as the real one, at a fraction of the cost


@pytest.fixture
def small_floor(scorer, tmp_path, monkeypatch):
    """The scorer, an empty cache folder, and a floor of SMALL_FLOOR images."""
    monkeypatch.setenv(gm.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gm, "FLOOR_SAMPLES", SMALL_FLOOR)

    def outputs():
        return scorer.real_outputs("train", SMALL_FLOOR, gm.floor_indices, stream=gm.FLOOR_STREAM)
    return scorer, tmp_path / "cache", outputs


def test_cached_outputs_are_bit_identical_to_computed_ones(small_floor):
    scorer, cache, outputs = small_floor
    before = scorer.images_scored
    computed = outputs()                             # empty cache: classified, then written
    assert scorer.images_scored == before + SMALL_FLOOR
    (path,) = cache.rglob("*.pt")
    assert scorer.weights_sha256[:16] in str(path) and not list(cache.rglob(".*tmp*"))
    cached = outputs()                               # read back: nothing classified
    assert scorer.images_scored == before + SMALL_FLOOR
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(computed, cached))
    # the same rows the classifier gives on those training images, computed here
    images, _ = load_mnist("train")
    direct = scorer.features_and_log_probs(to_unit_range(images[gm.floor_indices()]))
    assert all(torch.equal(a, b) for a, b in zip(direct, cached))
    # and the numbers from them are the same
    assert scorer.metrics(*computed) == scorer.metrics(*cached)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other_key", "wrong_shape", "nan"])
def test_a_damaged_cache_file_is_recomputed_and_rewritten(small_floor, damage):
    scorer, cache, outputs = small_floor
    computed = outputs()
    (path,) = cache.rglob("*.pt")
    blob = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a tensor file")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_key":   # a file written for other weights, copied over this one
        torch.save({**blob, "key": json.dumps({**json.loads(blob["key"]), "weights_sha256": "0" * 64})}, path)
    elif damage == "wrong_shape":
        torch.save({**blob, "features": blob["features"][:-1]}, path)
    else:
        torch.save({**blob, "features": blob["features"].clone().fill_(float("nan"))}, path)
    before = scorer.images_scored
    again = outputs()                                # recomputed, no error
    assert scorer.images_scored == before + SMALL_FLOOR
    assert all(torch.equal(a, b) for a, b in zip(computed, again))
    key = scorer.cache_key("train", SMALL_FLOOR, gm.FLOOR_STREAM)
    assert gm.read_cached(path, key, SMALL_FLOOR) is not None       # and written again, whole


def test_a_cache_folder_that_cannot_be_written_costs_only_the_recomputation(small_floor, monkeypatch, tmp_path):
    scorer, _, outputs = small_floor
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(gm.CACHE_ENV, str(blocker / "cache"))   # under a file: nothing can be made there
    before = scorer.images_scored
    first, second = outputs(), outputs()
    assert scorer.images_scored == before + 2 * SMALL_FLOOR     # no error, each call classified the images
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_cache_key_names_the_weights_the_images_and_the_device(scorer, monkeypatch, tmp_path):
    from trainers.classifier import DEFAULT_WEIGHTS, sha256_of
    key = scorer.cache_key("train", gm.FLOOR_SAMPLES, gm.FLOOR_STREAM)
    assert key["weights_sha256"] == sha256_of(DEFAULT_WEIGHTS)
    assert (key["split"], key["n"], key["stream"], key["device"]) == ("train", 10_000, gm.FLOOR_STREAM, "cpu")
    assert key != scorer.cache_key("train", 2_000, gm.FLOOR_STREAM) != scorer.cache_key("test", 2_000, None)
    monkeypatch.delenv(gm.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gm.cache_dir() == tmp_path / ".cache" / "palgan"
    monkeypatch.setenv(gm.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert gm.cache_dir() == tmp_path / "elsewhere"


# --- endpoints and walks with a generator whose images are known -----------------------------

def same_pixels(a, b) -> bool:
    """Two PNGs show the same picture (to rounding in the last colour bit)."""
    x, y = mpimg.imread(a), mpimg.imread(b)
    return x.shape == y.shape and float(np.abs(x - y).mean()) < 1e-4


class BankGenerator(nn.Module):
    """A stand-in generator: z picks one real MNIST test image (the first coordinate decides which)."""

    latent_dim = 8

    def __init__(self):
        super().__init__()
        images, self.labels = load_mnist("test")
        self.register_buffer("bank", to_unit_range(images[:3000]))
        self.anchor = nn.Parameter(torch.zeros(()))   # gives the walk a device

    def index(self, z):
        return (z.flatten(1)[:, 0].double() * 1e4).floor().long() % len(self.bank)

    def forward(self, z):
        return self.bank[self.index(z)] + 0 * self.anchor


def test_endpoints_are_the_most_confident_draws_of_each_digit(scorer, tmp_path):
    g = BankGenerator()
    ends = gw.find_endpoints(g, scorer, [8, 3, 1, 7], draws=1000)
    for digit, (z, conf) in ends.items():
        assert int(g.labels[g.index(z[None])]) == digit and conf > 0.9
    walks, figures = gw.interpolate(g, scorer, [(8, 3), (1, 7)], 5, "both", tmp_path, draws=1000)
    for w in walks:
        assert w.t == pytest.approx([0, 0.25, 0.5, 0.75, 1])
        assert w.predicted[0] == w.pair[0] and w.predicted[-1] == w.pair[1]
        assert torch.equal(w.images[0], g(ends[w.pair[0]][0][None])[0])
    assert sorted(p.name for p in figures.values()) == sorted(
        ["interp_linear_8-3.png", "interp_slerp_8-3.png", "interp_linear_1-7.png", "interp_slerp_1-7.png",
         "interp_linear_vs_slerp.png"])
    # each figure shows its own walk: the file equals the walk drawn again
    for w in walks:
        redrawn = gw.plot_strip(w, tmp_path / "redrawn" / "strip.png")
        assert same_pixels(figures[f"interp/{w.mode}_{w.pair[0]}-{w.pair[1]}"], redrawn), (w.mode, w.pair)
    redrawn = gw.plot_comparison(walks, tmp_path / "redrawn" / "comparison.png")
    assert same_pixels(figures["interp/linear_vs_slerp"], redrawn)


# --- the EMA generator's BatchNorm calibration and the commands' device -------------------------

def test_batchnorm_calibration_is_the_average_of_the_fixed_batches_statistics():
    """Each BatchNorm's running mean and variance become the averages, over the BN_CALIBRATION batches
    of the BN_STREAM z, of its input's per-batch mean and unbiased variance (computed here by hooks)."""
    from models.dcgan import Generator
    torch.manual_seed(0)
    g = Generator(base_channels=4)
    g.train()(torch.randn(32, g.latent_dim))          # running statistics away from their initial values
    norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    seen = {m: [] for m in norms}
    hooks = [m.register_forward_hook(lambda m, args, out: seen[m].append(args[0].detach().double())) for m in norms]
    seed, (batches, size) = 3, BN_CALIBRATION
    assert calibrate_batchnorm(g, seed, batches, size) is g and not g.training
    for h in hooks:
        h.remove()
    for m in norms:
        assert len(seen[m]) == batches and int(m.num_batches_tracked) == batches
        mean = torch.stack([x.mean((0, 2, 3)) for x in seen[m]]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen[m]]).mean(0)
        assert torch.allclose(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert [m.momentum for m in norms] == momenta
    # the batches were the fixed stream's z: the first BatchNorm saw the first layer's output of them
    with torch.no_grad():
        for k in range(batches):
            z = noise(size, g.latent_dim, seed, BN_STREAM, k)
            assert torch.equal(seen[norms[0]][k], g.net[0](z[:, :, None, None]).double()), k


def test_commands_run_on_the_accelerators_device_else_the_gpu_else_the_cpu():
    from trainers.gan_sampling import command_device

    class Fake:
        device = torch.device("cuda", 1)
    assert command_device(Fake()) == torch.device("cuda", 1)   # a rank of a multi-GPU launch: its own GPU
    assert command_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the trainer hooks and the CLIs on a tiny checkpoint ----------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Four iterations of a 4-channel GAN, with the hooks' sample counts cut down (the floor stays 10,000)."""
    out = tmp_path_factory.mktemp("gan")
    cfg = gan.make_config("cpu-demo", base_channels=4, batch_size=16, train_subset=64, epochs=1, stages="0,1",
                          stage_samples=300, eval_samples=1000, wandb=False, progress=False, out_dir=str(out),
                          run_name="tiny", num_threads=1)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("ENDPOINT_DRAWS", 200), ("DEFAULT_PAIRS", "8-3,4-9")):
            mp.setattr(gw, name, value)
        metrics = gan.train(cfg)
    return cfg.run_dir, metrics


def test_training_hooks_write_final_numbers_and_walk_figures(tiny_run, scorer, tmp_path):
    run_dir, metrics = tiny_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    final = on_disk["final"]
    numbers_ = ("fid", "classifier_score", "class_entropy", "min_class_frac", "max_class_frac",
                *(f"class_frac_{d}" for d in range(10)))
    assert set(final) == {"n", "n_floor", "fid_over_floor", *numbers_, *(f"{k}_floor" for k in numbers_)}
    assert final["fid_over_floor"] == round(final["fid"] / final["fid_floor"], 2)
    assert "eval_images_per_rank" not in on_disk and not (run_dir / "debug.json").exists()
    assert final["n"] == 1000 and final["n_floor"] == 10_000
    assert math.isclose(sum(final[f"class_frac_{d}"] for d in range(10)), 1, abs_tol=1e-3)
    assert final["fid"] > final["fid_floor"]     # four iterations of a 4-channel GAN are far from MNIST
    assert "eval/fid" in on_disk["stages"]["0"] and "eval/classifier_score" in on_disk["stages"]["1"]
    # the final numbers are those of the saved generator: `evaluate` on the last checkpoint agrees
    checked = evaluate_main(["--checkpoint", str(run_dir), "--n", "1000", "--out", str(tmp_path / "eval")])
    for key in ("fid", "classifier_score", "class_entropy", "min_class_frac", "max_class_frac"):
        assert final[key] == pytest.approx(checked["generated"][key], rel=1e-4, abs=1e-6), key
        assert final[f"{key}_floor"] == pytest.approx(checked["real_floor"][key], rel=1e-4, abs=1e-6), key
    for d in range(10):
        assert final[f"class_frac_{d}"] == pytest.approx(checked["generated"]["class_hist"][d], abs=1e-6), d
    assert same_pixels(run_dir / "figures" / "class_histogram.png", tmp_path / "eval" / "class_histogram.png")
    # the walk figures are those of the saved generator's walks, drawn again here
    generator, _ = load_generator_state(run_dir)
    _, figures = gw.interpolate(generator, scorer, [(8, 3), (4, 9)], 9, "both", tmp_path / "walks", draws=200)
    assert len(figures) == 5
    for path in figures.values():
        assert same_pixels(run_dir / "figures" / path.name, path), path.name


def test_stage_metrics_leave_the_training_state_alone(scorer):
    """The trainer calls this mid-run: no global RNG draws (resume must stay bit-exact), mode restored."""
    from models.dcgan import Generator
    g = Generator(base_channels=2).train()
    before = [p.detach().clone() for p in g.parameters()], [b.clone() for b in g.buffers()]
    rng = torch.get_rng_state()
    numbers = gm.stage_metrics(g, "cpu", n=200)
    assert torch.equal(rng, torch.get_rng_state()) and g.training
    assert all(torch.equal(a, b) for a, b in zip(before[0], g.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[1], g.buffers()))   # BatchNorm stats untouched
    assert set(numbers) == {"eval/fid", "eval/classifier_score", "eval/class_entropy", "eval/min_class_frac",
                            "eval/max_class_frac"} and all(math.isfinite(v) for v in numbers.values())


def numbers(text: str) -> dict:
    """metric name -> (generated, floor) from the printed report."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(.+?)\s{2,}(-?[\d.]+)\s+(-?[\d.]+)$", line)
        if m:
            out[m.group(1).strip()] = (float(m.group(2)), float(m.group(3)))
    return out


def test_evaluate_prints_every_number_and_matches_evaluating_the_sampled_file(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    run_cli(gan.main, ["evaluate", "--checkpoint", str(run_dir), "--n", "400", "--out", str(tmp_path / "ckpt_eval")])
    stdout = capsys.readouterr().out
    printed = numbers(stdout)
    saved = json.loads((tmp_path / "ckpt_eval" / "metrics.json").read_text())
    assert set(saved) == {"source", "generated", "real_floor", "fid_over_floor", "config", "processes"}
    assert saved["fid_over_floor"] == round(saved["generated"]["fid"] / saved["real_floor"]["fid"], 2)
    assert f"FID / floor {saved['fid_over_floor']:.2f}" in stdout
    redrawn = gm.plot_class_histogram(saved["generated"], saved["real_floor"], tmp_path / "redrawn.png")
    assert same_pixels(tmp_path / "ckpt_eval" / "class_histogram.png", redrawn)
    names = {"FID vs MNIST test (classifier features)": "fid", "classifier score exp(E KL)": "classifier_score",
             "class-histogram entropy (nats, max 2.303)": "class_entropy",
             "smallest class fraction": "min_class_frac", "largest class fraction": "max_class_frac"}
    for label, key in names.items():
        assert printed[label][0] == pytest.approx(saved["generated"][key], abs=2e-3), label
        assert printed[label][1] == pytest.approx(saved["real_floor"][key], abs=2e-3), label
    assert printed["images"] == (400, 10_000)
    for label in ("generated", "real floor"):
        assert len(re.findall(r"\d\.\d{3}", stdout.split(f"class fractions 0-9 ({label}):")[1].splitlines()[0])) == 10
    # the same images through `sample --out x.pt` and `evaluate --images x.pt` give the same numbers
    pt = tmp_path / "samples.pt"
    run_cli(gan.main, ["sample", "--checkpoint", str(run_dir), "--n", "400", "--out", str(pt)])
    evaluate_main(["--images", str(pt)])
    from_file = json.loads((tmp_path / "samples_eval" / "metrics.json").read_text())   # written next to the .pt
    assert from_file["source"] == str(pt.resolve())
    for key in names.values():
        assert from_file["generated"][key] == pytest.approx(saved["generated"][key], rel=1e-4, abs=1e-6)


def test_interpolate_writes_every_figure_and_logs_images_and_table_to_wandb(tiny_run, scorer, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "walks"
    run_cli(gan.main, ["interpolate", "--checkpoint", str(run_dir), "--pairs", "8-3,1-7", "--steps", "5",
                       "--mode", "both", "--draws", "256", "--out", str(out), "--wandb"])
    stdout = capsys.readouterr().out
    expected = ["interp_linear_8-3", "interp_slerp_8-3", "interp_linear_1-7", "interp_slerp_1-7",
                "interp_linear_vs_slerp"]
    generator, _ = load_generator_state(run_dir)     # the same walks, each drawn again here
    walks, _ = gw.interpolate(generator, scorer, [(8, 3), (1, 7)], 5, "both", tmp_path / "redrawn", draws=256)
    assert sorted(f"interp_{w.mode}_{w.pair[0]}-{w.pair[1]}" for w in walks) == sorted(expected[:4])
    for w in walks:
        name = f"interp_{w.mode}_{w.pair[0]}-{w.pair[1]}.png"
        assert same_pixels(out / name, gw.plot_strip(w, tmp_path / "strip.png")), name
    assert same_pixels(out / "interp_linear_vs_slerp.png", gw.plot_comparison(walks, tmp_path / "both.png"))
    walk_lines = [line for line in stdout.splitlines() if re.match(r"(linear|slerp)\s+\d->\d", line)]
    assert len(walk_lines) == 4 and all(len(re.findall(r"\d:[01]\.\d\d", line)) == 5 for line in walk_lines)
    run_files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged = {k: v for row in read_offline_run(run_files[0])["history"] for k, v in row.items()}
    for name in expected:   # the images wandb holds are the figures written to --out
        assert logged[f"interp/{name[len('interp_'):]}/_type"] == "image-file", name
        media = run_files[0].parent / "files" / logged[f"interp/{name[len('interp_'):]}/path"]
        assert media.read_bytes() == (out / f"{name}.png").read_bytes(), name
    assert logged["interp/walks/_type"] == "table-file" and int(logged["interp/walks/nrows"]) == 20
    table = json.loads((run_files[0].parent / "files" / logged["interp/walks/path"]).read_text())
    assert table["columns"][:5] == ["pair", "mode", "t", "predicted_class", "confidence"]
    assert sorted({r[2] for r in table["data"]}) == [0, 0.25, 0.5, 0.75, 1]
    assert sorted({(r[0], r[1]) for r in table["data"]}) == [("1-7", "linear"), ("1-7", "slerp"),
                                                            ("8-3", "linear"), ("8-3", "slerp")]


def test_single_mode_writes_no_comparison(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    interpolate_main(["--checkpoint", str(run_dir), "--pairs", "0-6", "--steps", "3", "--mode", "slerp",
                         "--draws", "64", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["interp_slerp_0-6.png"]
    assert re.search(r"slerp\s+0->6(\s+\d:[01]\.\d\d){3}", capsys.readouterr().out)


# --- bad input: exit 2, one line, no traceback -------------------------------------------------

def test_missing_checkpoint_is_one_line_exit_2():
    assert_usage_error(run_script(["trainers/gan.py", "interpolate", "--checkpoint", "no/such/run"]),
                       "no/such/run")


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gan.main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["interpolate", "--pairs", "8-3,17"], "--pairs"),
    (["interpolate", "--steps", "1"], "--steps"),
    (["interpolate", "--mode", "cubic"], "--mode"),
    (["evaluate", "--checkpoint", "no/such/run"], "no/such/run"),
    (["evaluate"], "exactly one of"),
])
def test_bad_interpolate_and_evaluate_flags(tiny_run, capsys, argv, needle):
    run_dir, _ = tiny_run
    if argv[0] == "interpolate":
        argv = [*argv, "--checkpoint", str(run_dir)]
    assert needle in usage_error(capsys, argv)


@pytest.mark.parametrize("content", ["wrong_shape", "grey_uint8", "out_of_range", "not_a_tensor_file", "missing"])
def test_bad_images_file(tmp_path, capsys, content):
    path = tmp_path / "images.pt"
    if content == "wrong_shape":
        torch.save(torch.zeros(10, 28, 28), path)
    elif content == "grey_uint8":
        torch.save(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), path)
    elif content == "out_of_range":
        torch.save(torch.full((10, 1, 28, 28), 3.0), path)
    elif content == "not_a_tensor_file":
        path.write_text("hello")
    err = usage_error(capsys, ["evaluate", "--images", str(path)])
    assert str(path) in err
    assert not (tmp_path / "images_eval").exists()   # nothing written for bad input


def test_the_scorer_cache_has_one_key_per_device(monkeypatch):
    """"cuda" (what stage metrics pass) and "cuda:0" (the final evaluation's accelerator.device) are
    one GPU: one Scorer, so the test set's features are computed once."""
    from trainers.gan_metrics import device_key
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device_key("cuda") == device_key("cuda:0") == device_key(torch.device("cuda", 0)) == "cuda:0"
    assert device_key("cuda:1") == "cuda:1"
    assert device_key("cpu") == device_key("cpu:0") == "cpu"
