"""Mixed precision: every LSTM backend runs and trains under Accelerate's bf16 autocast on CPU,
with gradients that agree with float32 to bf16 accuracy; fp16 autocast runs too (the GPU path).
The RNN baseline runs forward and backward under autocast, bf16 and fp16 in one process.

PALGAN_TEST_DEVICE=cuda runs the fp16 and bf16 checks on a GPU (benchmarks/gpu_check.sh does).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from models.lstm import BACKENDS, LSTM
from models.rnn import RNN
from trainers.lstm import encode, palindromes
from trainers.runtime import make_accelerator

DEVICE = torch.device(os.environ.get("PALGAN_TEST_DEVICE", "cpu"))
# "compile" trains under bf16 below; its gradients are checked against "script" in test_models.py
# (a compilation per autocast dtype is too slow on a small CPU to repeat for every check here).
LOOPS = tuple(b for b in BACKENDS if b != "compile")




def batch(seed: int, n: int = 64, length: int = 6):
    x, y = encode(palindromes(n, length, torch.Generator().manual_seed(seed)), "onehot")
    return x.to(DEVICE), y.to(DEVICE)


def gradients(model, x, y, autocast_dtype=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_training_under_accelerate_lowers_the_loss(backend, tmp_path):
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    accelerator = make_accelerator("bf16", use_wandb=False, run_dir=tmp_path)
    torch.manual_seed(0)
    model = LSTM(10, 32, 10, backend=backend)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = batch(seed=1, n=64, length=5)
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    if backend == "script":   # the fused layer runs its whole recurrence in autocast's dtype
        with torch.no_grad(), accelerator.autocast():
            _, states = model(x, return_states=True)
        h = states["h"]       # prepare() casts outputs back to fp32; the values must be bf16 ones
        assert torch.equal(h, h.bfloat16().float()), "the recurrence did not run in bf16"
    losses = []
    for _ in range(25):
        with accelerator.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", LOOPS)
def test_autocast_gradients_agree_with_float32(backend, dtype):
    """Same weights, same batch: low-precision gradients within a few bf16/fp16 ulps of fp32."""
    if DEVICE.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(2)
    model = LSTM(10, 48, 10, backend=backend).to(DEVICE)
    x, y = batch(seed=3, length=12)
    reference = gradients(model, x, y)
    low = gradients(model, x, y, autocast_dtype=dtype)
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.004), fp16 11 bits; errors add up
    # over the 11 steps and the 48-long dot products.
    tol = 0.03 if dtype == torch.bfloat16 else 0.005
    for name, g in reference.items():
        assert low[name].dtype == torch.float32
        err = relative_error(low[name], g)
        assert err < tol, f"{name}: relative error {err:.4f} >= {tol}"


def test_script_and_eager_agree_under_bf16():
    """The fused layer casts like autocast does: its bf16 logits match the eager loop's."""
    torch.manual_seed(4)
    script = LSTM(10, 32, 10, backend="script").to(DEVICE)
    eager = LSTM(10, 32, 10, backend="eager").to(DEVICE)
    eager.load_gate_weights(script.gate_weights())
    x, _ = batch(seed=5, length=9)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        a, b = script(x).float(), eager(x).float()
    with torch.no_grad():
        exact = script(x)
    assert relative_error(a, exact) < 0.03 and relative_error(b, exact) < 0.03
    assert relative_error(a, b) < 0.03


@pytest.mark.parametrize("backend", LOOPS)
def test_rnn_under_autocast_agrees_with_float32_eager(backend):
    """Forward and backward under bf16 autocast, then fp16, then bf16 again in one process (the
    scripted loop must not keep one autocast dtype's graph): logits and gradients within bf16/fp16
    accuracy of the fp32 eager loop, gradients in the parameters' dtype."""
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(6)
    model = RNN(10, 32, 10, backend=backend).to(DEVICE)
    reference = RNN(10, 32, 10, backend="eager").to(DEVICE)
    reference.load_gate_weights(model.gate_weights())
    x, y = batch(seed=7, length=9)
    exact = reference(x)
    expected = gradients(reference, x, y)
    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
        with torch.autocast(DEVICE.type, dtype=dtype):
            logits = model(x)
        low = gradients(model, x, y, autocast_dtype=dtype)
        tol = 0.03 if dtype == torch.bfloat16 else 0.005   # 8 and 11 significant bits, as above
        assert relative_error(logits, exact) < tol, f"{dtype} logits"
        for name, g in expected.items():
            assert low[name].dtype == dict(model.named_parameters())[name].dtype == torch.float32, name
            err = relative_error(low[name], g)
            assert err < tol, f"{dtype} {name}: relative error {err:.4f} >= {tol}"
