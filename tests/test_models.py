"""The from-scratch LSTM and RNN against independent oracles, for every backend.

Oracles: ``torch.nn.LSTM``/``torch.nn.RNN`` + ``nn.Linear`` with weights copied through
``gate_weights()`` (logits and every gradient), ``torch.autograd.gradcheck`` in float64, and a
step-by-step recomputation of equations 1-6 in plain PyTorch (one matmul per gate, as the
report writes them). Sizes are random (seeded per case); L runs from 1 to 50.

PALGAN_TEST_DEVICE=cuda runs the same checks on a GPU (benchmarks/gpu_check.sh does).
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from torch import nn
from torch.func import functional_call

import models.lstm_fused as lstm_fused
from models import lstm_kernels
from models.lstm import BACKENDS, GATES, LSTM
from models.rnn import RNN
from conftest import run_script

DEVICE = torch.device(os.environ.get("PALGAN_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # oracle comparisons need true fp32 matmuls, not TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False



# On CUDA, cuDNN's fp32 kernels sum in another order than the loops: the parity tests measured up to
# 1.7e-5 on an NVIDIA H200 (benchmarks/results/gpu/nvidia-h200/gpu_check.txt), so fp32 gets 5e-5 there.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5 if DEVICE.type == "cpu" else 5e-5}
# The LSTM's paths: the fused layer with its C++ step kernels (CPU, float32/64), the fused layer
# with its pointwise work in TorchScript ops (GPU, bf16/fp16, or no compiler), the eager loop.
LSTM_PATHS = ("script", "script-ts", "eager")


def path_args(path: str) -> dict:
    """LSTM arguments of a path: "script-ts" is the fused layer with ``kernels="script"``."""
    if path == "script-ts":
        return {"backend": "script", "kernels": "script"}
    return {"backend": path}


LENGTHS = (1, 2, 7, 23, 50)
# The backends the broad parametrised checks run; "compile" (slow to compile on a small CPU) is
# checked against "script" by the compile tests below, at two batch sizes and lengths.
LOOPS = tuple(b for b in BACKENDS if b != "compile")
TORCH_ORDER = ("i", "f", "g", "o")   # nn.LSTM stacks its gates as i, f, g, o


def random_sizes(seed: int) -> tuple[int, int, int, int]:
    """(B, D, H, K) drawn from a generator seeded by the case, so failures reproduce."""
    g = torch.Generator().manual_seed(seed)
    B, D, H, K = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for lo, hi in
                  ((1, 6), (1, 7), (1, 9), (2, 6)))
    return B, D, H, K


def randomise(model: nn.Module, seed: int) -> None:
    """Non-zero biases everywhere, so a bias mix-up cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.6)


def grads_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameter gradients in ``gate_weights()`` form.

    ``gate_weights()`` only slices parameters, so applying it to the gradients (put in the
    parameters' place for a moment) maps them with the same public API the tests check.
    """
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
        out = model.gate_weights()
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    return out


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


# --- LSTM -----------------------------------------------------------------------------------

def torch_lstm_from(weights: dict, D: int, H: int, K: int, dtype) -> tuple[nn.LSTM, nn.Linear]:
    lstm = nn.LSTM(D, H, batch_first=True).to(DEVICE, dtype)
    head = nn.Linear(H, K).to(DEVICE, dtype)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.cat([weights[f"W_{k}x"].T for k in TORCH_ORDER]))  # (4H, D)
        lstm.weight_hh_l0.copy_(torch.cat([weights[f"W_{k}h"].T for k in TORCH_ORDER]))  # (4H, H)
        lstm.bias_ih_l0.copy_(torch.cat([weights[f"b_{k}"] for k in TORCH_ORDER]))
        lstm.bias_hh_l0.zero_()
        head.weight.copy_(weights["W_ph"].T)
        head.bias.copy_(weights["b_p"])
    return lstm, head


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("backend", LSTM_PATHS)
def test_lstm_logits_and_every_gradient_match_nn_lstm(backend, L, dtype):
    B, D, H, K = random_sizes(L)
    torch.manual_seed(L)
    model = LSTM(D, H, K, **path_args(backend)).to(DEVICE, dtype)
    randomise(model, seed=L)
    lstm, head = torch_lstm_from(model.gate_weights(), D, H, K, dtype)
    x = torch.randn(B, L, D, dtype=dtype, device=DEVICE)
    dp = torch.randn(B, K, dtype=dtype, device=DEVICE)          # a random upstream gradient
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    p = model(x_ours)
    (p * dp).sum().backward()
    out, _ = lstm(x_ref)
    p_ref = head(out[:, -1])
    (p_ref * dp).sum().backward()

    tol = TOL[dtype]
    assert_close(p, p_ref, tol, "logits")
    assert_close(x_ours.grad, x_ref.grad, tol, "dL/dx")
    ours = grads_by_name(model)
    rows = {k: slice(n * H, (n + 1) * H) for n, k in enumerate(TORCH_ORDER)}
    for k in GATES:
        assert_close(ours[f"W_{k}x"], lstm.weight_ih_l0.grad[rows[k]].T, tol, f"dL/dW_{k}x")
        assert_close(ours[f"W_{k}h"], lstm.weight_hh_l0.grad[rows[k]].T, tol, f"dL/dW_{k}h")
        assert_close(ours[f"b_{k}"], lstm.bias_ih_l0.grad[rows[k]], tol, f"dL/db_{k}")
    assert_close(ours["W_ph"], head.weight.grad.T, tol, "dL/dW_ph")
    assert_close(ours["b_p"], head.bias.grad, tol, "dL/db_p")


def lstm_by_the_equations(w: dict, x: torch.Tensor):
    """Equations 1-7 step by step, one matmul per gate, from ``gate_weights()``."""
    B, L, _ = x.shape
    h = x.new_zeros(B, w["W_gh"].shape[0])
    c = torch.zeros_like(h)
    states = {k: [] for k in ("g", "i", "f", "o", "c", "h")}
    for t in range(L):
        x_t = x[:, t]
        g = torch.tanh(x_t @ w["W_gx"] + h @ w["W_gh"] + w["b_g"])     # (1)
        i = torch.sigmoid(x_t @ w["W_ix"] + h @ w["W_ih"] + w["b_i"])  # (2)
        f = torch.sigmoid(x_t @ w["W_fx"] + h @ w["W_fh"] + w["b_f"])  # (3)
        o = torch.sigmoid(x_t @ w["W_ox"] + h @ w["W_oh"] + w["b_o"])  # (4)
        c = g * i + c * f                                              # (5)
        h = torch.tanh(c) * o                                          # (6)
        for k, v in zip(("g", "i", "f", "o", "c", "h"), (g, i, f, o, c, h)):
            states[k].append(v)
    p = h @ w["W_ph"] + w["b_p"]                                       # (7)
    return p, {k: torch.stack(v, dim=1) for k, v in states.items()}


@pytest.mark.parametrize("L", (1, 9, 50))
@pytest.mark.parametrize("backend", LSTM_PATHS)
def test_lstm_return_states_follow_equations_1_to_6(backend, L):
    B, D, H, K = random_sizes(100 + L)
    torch.manual_seed(L)
    model = LSTM(D, H, K, **path_args(backend)).to(DEVICE, torch.float64)
    randomise(model, seed=100 + L)
    x = torch.randn(B, L, D, dtype=torch.float64, device=DEVICE)
    p, states = model(x, return_states=True)
    p_ref, ref = lstm_by_the_equations(model.gate_weights(), x)
    assert_close(p, p_ref, 1e-10, "logits")
    assert set(states) == set(ref)
    for k in ref:
        assert_close(states[k], ref[k], 1e-10, f"state {k}")
    assert_close(model(x), p, 0.0, "logits with and without return_states")


@pytest.mark.parametrize("backend", LSTM_PATHS)
def test_lstm_gradcheck_float64(backend):
    B, L, D, H, K = 3, 5, 4, 3, 2
    model = LSTM(D, H, K, **path_args(backend)).to(DEVICE, torch.float64)
    randomise(model, seed=7)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(B, L, D, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def logits(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(logits, (x, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", LSTM_PATHS)
def test_lstm_gradient_flows_through_returned_h_states(backend):
    """A loss on every step's h (not only the last) back-propagates like the reference."""
    B, L, D, H, K = 2, 6, 3, 4, 2
    model = LSTM(D, H, K, **path_args(backend)).to(DEVICE, torch.float64)
    randomise(model, seed=11)
    x = torch.randn(B, L, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(B, L, H, dtype=torch.float64, device=DEVICE)
    _, states = model(x, return_states=True)
    (states["h"] * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    gw = {k: v.requires_grad_() for k, v in model.gate_weights().items()}
    _, ref = lstm_by_the_equations(gw, x)
    (ref["h"] * w).sum().backward()
    assert_close(ours, x.grad, 1e-10, "dL/dx through h_1..h_L")


@pytest.mark.parametrize("backend", LSTM_PATHS)
def test_lstm_gate_weights_round_trip(backend):
    torch.manual_seed(3)
    a = LSTM(5, 6, 4, **path_args(backend)).to(DEVICE)
    b = LSTM(5, 6, 4, **path_args(backend)).to(DEVICE)
    randomise(a, seed=3)
    w = a.gate_weights()
    assert set(w) == {f"{p}_{k}{s}" for k in GATES for p, s in (("W", "x"), ("W", "h"), ("b", ""))} | {"W_ph", "b_p"}
    assert w["W_gx"].shape == (5, 6) and w["W_oh"].shape == (6, 6) and w["W_ph"].shape == (6, 4)
    b.load_gate_weights(w)
    for k, v in b.gate_weights().items():
        assert torch.equal(v, w[k]), k
    x = torch.randn(3, 8, 5, device=DEVICE)
    assert torch.equal(a(x), b(x))


# --- the fused layer's C++ step kernels ---------------------------------------------------------

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler: the fused layer runs its TorchScript-only path")


@needs_compiler
def test_cpu_kernels_build_and_are_used():
    assert lstm_kernels.available(), "the C++ step kernels did not build on a machine with a compiler"
    x = torch.randn(2, 3, 4)
    assert lstm_fused.cpu_step_functions(x) is not None
    assert lstm_fused.cpu_step_functions(x, "cpp") is not None
    assert lstm_fused.cpu_step_functions(x, "script") is None
    assert lstm_fused.cpu_step_functions(x.to(torch.bfloat16)) is None   # bf16 takes the TorchScript path
    with pytest.raises(RuntimeError, match="kernels='cpp'.*float32/float64 on CPU"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            LSTM(4, 3, 2, kernels="cpp")(x)


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        LSTM(2, 3, 4, kernels="cuda")


@needs_compiler
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels are CPU kernels")
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("one_hot", (False, True), ids=("dense", "one-hot"))
@pytest.mark.parametrize("B, D, H, L", [(40, 10, 48, 12), (33, 7, 37, 5), (128, 10, 64, 3), (24, 40, 32, 4),
                                        (128, 10, 128, 10)])
def test_lstm_kernels_at_vector_sizes_match_nn_lstm(B, D, H, L, threads, one_hot):
    """Sizes where the kernels' 16-wide vector loops, their masked tails (H = 37), the split of
    the batch over threads (B >= 32) and both forms of the input projection (D <= 32: added per
    row, skipping zeros, as with one-hot input; D = 40: inside the matmul) are all exercised, and
    (B = H = 128, L = 10) the backward's ring of 4 steps, so the weight gradient comes in three
    runs of steps, the first of them short (2 steps); float32 against nn.LSTM and against the
    TorchScript-only path, with the weight gradients through the op and through addmm."""
    torch.set_num_threads(threads)
    torch.manual_seed(B + H)
    model = LSTM(D, H, 5, kernels="cpp")
    randomise(model, seed=B + H)
    with torch.no_grad():
        model.W_x.mul_(2.0)                      # pre-activations well beyond the sigmoid's linear range
    model_ts = LSTM(D, H, 5, kernels="script")
    model_addmm = LSTM(D, H, 5, kernels="cpp", weight_grad_kernel=False)
    for other in (model_ts, model_addmm):
        other.load_state_dict(model.state_dict())
    lstm, head = torch_lstm_from(model.gate_weights(), D, H, 5, torch.float32)
    x = torch.randn(B, L, D)
    if one_hot:
        x = nn.functional.one_hot(x.argmax(-1), D).float()
    dp = torch.randn(B, 5)

    def run(model: LSTM):
        p = model(x)
        (p * dp).sum().backward()
        with torch.no_grad():
            p_infer = model(x)                 # the inference path (ring buffers)
        return p.detach(), p_infer, {n: q.grad.clone() for n, q in model.named_parameters()}

    p, p_infer, grads = run(model)
    p_ts, _, grads_ts = run(model_ts)
    _, _, grads_addmm = run(model_addmm)
    out, _ = lstm(x)
    p_ref = head(out[:, -1])
    (p_ref * dp).sum().backward()
    p_scale = max(1.0, p_ref.abs().max().item())   # float32 rounding grows with the logits' size
    assert_close(p, p_ref, 2e-5 * p_scale, "logits vs nn.LSTM")
    assert_close(p_infer, p, 1e-6 * p_scale, "inference logits vs training logits")
    assert_close(p, p_ts, 2e-5 * p_scale, "logits vs the TorchScript-only path")
    W_ref = torch.cat([lstm.weight_ih_l0.grad, lstm.weight_hh_l0.grad], 1)           # (4H, D+H), i f g o
    b_ref = lstm.bias_ih_l0.grad
    order = [2, 0, 1, 3]                         # ours: g i f o
    W_ref = torch.cat([W_ref[k * H:(k + 1) * H] for k in order]).T
    b_ref = torch.cat([b_ref[k * H:(k + 1) * H] for k in order])
    scale = max(1.0, W_ref.abs().max().item())
    assert_close(torch.cat([grads["W_x"], grads["W_h"]]) / scale, W_ref / scale, 2e-5, "dL/dW vs nn.LSTM")
    assert_close(grads["b"], b_ref, 2e-5 * max(1.0, b_ref.abs().max().item()), "dL/db vs nn.LSTM")
    for name in grads:
        assert_close(grads[name], grads_ts[name], 2e-5 * max(1.0, grads_ts[name].abs().max().item()),
                     f"d{name} vs the TorchScript-only path")
        assert_close(grads_addmm[name], grads_ts[name], 2e-5 * max(1.0, grads_ts[name].abs().max().item()),
                     f"d{name} with addmm vs the TorchScript-only path")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels are CPU kernels")
@pytest.mark.parametrize("backend", LSTM_PATHS)
def test_lstm_nan_reaches_the_logits(backend):
    """A NaN weight must show in the output (the trainer stops on a NaN loss), not be clamped away."""
    model = LSTM(4, 16, 3, **path_args(backend))
    with torch.no_grad():
        model.W_h[3, 5] = float("nan")
    p = model(torch.randn(2, 6, 4))
    assert torch.isnan(p).all()


@needs_compiler
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("add", (False, True))
@pytest.mark.parametrize("N, M, G", [(111, 47, 148), (512, 138, 512), (16, 3, 40)])
def test_weight_grad_op_matches_matmul(N, M, G, add, dtype, threads):
    """palgan::lstm_weight_grad: dW (+)= xh^T dz, through the micro-kernel after a transpose
    (float32) or addmm (float64); against torch's matmul in float64. The scratch is dirty, and
    odd sizes leave tails in the transpose's tiles and the split of dW's columns."""
    assert lstm_kernels.available()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(N + M + G)
    xh = torch.randn(N, M, generator=gen, dtype=dtype)
    dz = torch.randn(N, G, generator=gen, dtype=dtype)
    dW = torch.randn(M, G, generator=gen, dtype=dtype)
    expected = xh.double().t() @ dz.double() + (dW.double() if add else 0.0)
    scratch = torch.full((M, N), float("nan"), dtype=dtype)
    torch.ops.palgan.lstm_weight_grad(xh, dz, dW, scratch, add)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(dW.double() / math.sqrt(N), expected / math.sqrt(N), tol, "dW vs xh.t() @ dz")


@needs_compiler
def test_weight_grad_benchmark_runs(capsys):
    """benchmarks/lstm_weight_grad.py, one round: both measurements print, with positive figures."""
    from benchmarks import lstm_weight_grad
    lstm_weight_grad.main(["--threads", "1", "--rounds", "1"])
    out = capsys.readouterr().out
    gflops = [float(line.split()[-2]) for line in out.splitlines() if line.endswith("GFLOP/s")]
    ms = [float(line.split(" ms ")[0].split()[-1]) for line in out.splitlines() if "x nn.LSTM)" in line]
    assert len(gflops) == 2 and len(ms) == 3 and min(gflops + ms) > 0, out


@needs_compiler
def test_lstm_step_matmul_fallback_matches_nn_lstm():
    """PALGAN_LSTM_BRGEMM=0: the step ops' matmuls through at::mm instead of the micro-kernel (the
    path where brgemm is missing); float32 logits and weight gradients against nn.LSTM."""
    code = """
import torch
from torch import nn
from models.lstm import LSTM
torch.manual_seed(0)
m = LSTM(10, 48, 5)
ref = nn.LSTM(10, 48, batch_first=True)
w = m.gate_weights(); order = ("i", "f", "g", "o")
with torch.no_grad():
    ref.weight_ih_l0.copy_(torch.cat([w[f"W_{k}x"].T for k in order]))
    ref.weight_hh_l0.copy_(torch.cat([w[f"W_{k}h"].T for k in order]))
    ref.bias_ih_l0.copy_(torch.cat([w[f"b_{k}"] for k in order])); ref.bias_hh_l0.zero_()
x = torch.randn(40, 9, 10)
h = m(x)
h_ref = ref(x)[0][:, -1] @ m.W_ph + m.b_p               # the same head on nn.LSTM's h_L
m(x).sum().backward()
(ref(x)[0][:, -1] @ m.W_ph.detach()).sum().backward()
g_ref = torch.cat([ref.weight_hh_l0.grad[k * 48:(k + 1) * 48] for k in (2, 0, 1, 3)]).T
print((h - h_ref).abs().max().item(), (m.W_h.grad - g_ref).abs().max().item())
"""
    proc = run_script(["-c", code], PALGAN_LSTM_BRGEMM="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    err_h, err_grad = map(float, proc.stdout.split())
    assert err_h < 1e-4 and err_grad < 1e-4, (err_h, err_grad)


def test_lstm_without_the_kernels_warns_once_and_matches(monkeypatch):
    """No compiler: one RuntimeWarning saying what to do, then the TorchScript-only path."""
    def no_compiler():
        raise RuntimeError("Error building extension 'palgan_lstm_cell': c++: not found")
    monkeypatch.setattr(lstm_kernels, "_loaded", None)
    monkeypatch.setattr(lstm_kernels, "build_and_load", no_compiler)
    monkeypatch.setattr(lstm_fused, "_cpu_step_functions", [])
    model = LSTM(3, 5, 2)
    x = torch.randn(4, 6, 3)
    with pytest.warns(RuntimeWarning, match="could not be built.*PALGAN_LSTM_KERNELS=0"):
        p = model(x)
    eager = LSTM(3, 5, 2, backend="eager")
    eager.load_gate_weights(model.gate_weights())
    assert_close(p, eager(x), 1e-5, "logits without the kernels")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no second warning
        model(x)


def test_kernel_switch_turns_the_build_off(tmp_path):
    code = ("import warnings; warnings.simplefilter('error'); import torch; from models import lstm_kernels;"
            "from models.lstm import LSTM; m = LSTM(3, 4, 2); m(torch.randn(2, 5, 3));"
            "print(lstm_kernels.available())")
    proc = run_script(["-c", code], PALGAN_LSTM_KERNELS="0", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
    assert not any(tmp_path.iterdir()), "PALGAN_LSTM_KERNELS=0 still built something"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        LSTM(2, 3, 4, backend="cudnn")
    with pytest.raises(ValueError, match="backend"):
        RNN(2, 3, 4, backend="cudnn")


# --- RNN ------------------------------------------------------------------------------------

def torch_rnn_from(w: dict, D: int, H: int, K: int, dtype) -> tuple[nn.RNN, nn.Linear]:
    rnn = nn.RNN(D, H, nonlinearity="tanh", batch_first=True).to(DEVICE, dtype)
    head = nn.Linear(H, K).to(DEVICE, dtype)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(w["W_hx"].T)
        rnn.weight_hh_l0.copy_(w["W_hh"].T)
        rnn.bias_ih_l0.copy_(w["b_h"])
        rnn.bias_hh_l0.zero_()
        head.weight.copy_(w["W_ph"].T)
        head.bias.copy_(w["b_p"])
    return rnn, head


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("backend", LOOPS)
def test_rnn_logits_and_every_gradient_match_nn_rnn(backend, L, dtype):
    B, D, H, K = random_sizes(200 + L)
    torch.manual_seed(L)
    model = RNN(D, H, K, backend=backend).to(DEVICE, dtype)
    randomise(model, seed=200 + L)
    rnn, head = torch_rnn_from(model.gate_weights(), D, H, K, dtype)
    x = torch.randn(B, L, D, dtype=dtype, device=DEVICE)
    dp = torch.randn(B, K, dtype=dtype, device=DEVICE)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    p = model(x_ours)
    (p * dp).sum().backward()
    out, _ = rnn(x_ref)
    p_ref = head(out[:, -1])
    (p_ref * dp).sum().backward()

    tol = TOL[dtype]
    assert_close(p, p_ref, tol, "logits")
    assert_close(x_ours.grad, x_ref.grad, tol, "dL/dx")
    ours = grads_by_name(model)
    assert_close(ours["W_hx"], rnn.weight_ih_l0.grad.T, tol, "dL/dW_hx")
    assert_close(ours["W_hh"], rnn.weight_hh_l0.grad.T, tol, "dL/dW_hh")
    assert_close(ours["b_h"], rnn.bias_ih_l0.grad, tol, "dL/db_h")
    assert_close(ours["W_ph"], head.weight.grad.T, tol, "dL/dW_ph")
    assert_close(ours["b_p"], head.bias.grad, tol, "dL/db_p")


@pytest.mark.parametrize("L", (1, 9, 50))
@pytest.mark.parametrize("backend", LOOPS)
def test_rnn_return_states_follow_the_recurrence(backend, L):
    B, D, H, K = random_sizes(300 + L)
    model = RNN(D, H, K, backend=backend).to(DEVICE, torch.float64)
    randomise(model, seed=300 + L)
    w = model.gate_weights()
    x = torch.randn(B, L, D, dtype=torch.float64, device=DEVICE)
    h, hs = x.new_zeros(B, H), []
    for t in range(L):
        h = torch.tanh(x[:, t] @ w["W_hx"] + h @ w["W_hh"] + w["b_h"])
        hs.append(h)
    p, states = model(x, return_states=True)
    assert set(states) == {"h"}
    assert_close(states["h"], torch.stack(hs, dim=1), 1e-10, "h")
    assert_close(p, h @ w["W_ph"] + w["b_p"], 1e-10, "logits")


@pytest.mark.parametrize("backend", LOOPS)
def test_rnn_gradcheck_float64(backend):
    model = RNN(3, 4, 2, backend=backend).to(DEVICE, torch.float64)
    randomise(model, seed=5)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(2, 6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def logits(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(logits, (x, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", LOOPS)
def test_rnn_gate_weights_round_trip(backend):
    a, b = RNN(3, 5, 4, backend=backend).to(DEVICE), RNN(3, 5, 4, backend=backend).to(DEVICE)
    randomise(a, seed=9)
    b.load_gate_weights(a.gate_weights())
    x = torch.randn(2, 7, 3, device=DEVICE)
    assert torch.equal(a(x), b(x))
    assert set(a.gate_weights()) == {"W_hx", "W_hh", "b_h", "W_ph", "b_p"}


# --- the compile backend ----------------------------------------------------------------------

def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("cls", (LSTM, RNN))
def test_compile_backend_matches_script_in_float32_and_compiles_once_for_every_length(cls):
    """torch.compile of the step: logits, every gradient (weights and input) and the returned states
    within 1e-5 of the script backend in float32; a second batch size and length compile nothing new."""
    torch.manual_seed(7)
    D, H, K = 4, 6, 3
    script_model = cls(D, H, K, backend="script").to(DEVICE)
    randomise(script_model, seed=7)
    compiled_model = cls(D, H, K, backend="compile").to(DEVICE)
    compiled_model.load_state_dict(script_model.state_dict())
    graphs = None
    for B, L in ((5, 4), (3, 9)):
        x = torch.randn(B, L, D, device=DEVICE)
        dp = torch.randn(B, K, device=DEVICE)
        out = {}
        for name, model in (("script", script_model), ("compile", compiled_model)):
            model.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_()
            p = model(xg)
            (p * dp).sum().backward()
            with torch.no_grad():
                _, states = model(x, return_states=True)
            out[name] = (p, xg.grad, grads_by_name(model), states)
        (p, dx, grads, states), (p_ref, dx_ref, grads_ref, states_ref) = out["compile"], out["script"]
        assert_close(p, p_ref, 1e-5, f"logits B={B} L={L}")
        assert_close(dx, dx_ref, 1e-5, f"dL/dx B={B} L={L}")
        for k in grads_ref:
            assert_close(grads[k], grads_ref[k], 1e-5, f"dL/d{k} B={B} L={L}")
        for k in states_ref:
            assert_close(states[k], states_ref[k], 1e-5, f"{k} B={B} L={L}")
        if graphs is None:
            graphs = compiled_graphs()
            assert graphs > 0
        else:
            assert compiled_graphs() == graphs, "a new batch size or length recompiled the step"
