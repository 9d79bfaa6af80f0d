"""The LSTM of the report, equations 1-8, written from the gate equations.

    g_t = tanh(x_t W_gx + h_{t-1} W_gh + b_g)        (1)  candidate
    i_t = sigma(x_t W_ix + h_{t-1} W_ih + b_i)       (2)  input gate
    f_t = sigma(x_t W_fx + h_{t-1} W_fh + b_f)       (3)  forget gate
    o_t = sigma(x_t W_ox + h_{t-1} W_oh + b_o)       (4)  output gate
    c_t = g_t * i_t + c_{t-1} * f_t                  (5)  cell state, c_0 = 0
    h_t = tanh(c_t) * o_t                            (6)  hidden state, h_0 = 0
    p   = h_L W_ph + b_p                             (7)  logits of the last step
    loss = -log softmax(p)_y                         (8)  belongs to the loss: ``F.cross_entropy(p, y)``

The four gates' weights are stored side by side, ``W_x: (D, 4H)`` and ``W_h: (H, 4H)`` in the
order g, i, f, o, so one step is one matmul; ``gate_weights()`` gives them back one by one in
the report's orientation (``x @ W_gx`` with ``W_gx: (D, H)``).

Backends:
- ``"script"`` (default): the fused layer of ``models/lstm_fused.py``, forward and hand-written
  back-propagation through time as TorchScript loops, each step one C++ op on CPU in
  float32/float64 (``kernels`` picks the form of the step).
- ``"eager"``: ``lstm_loop`` below, the plain Python loop with autograd, the reference.
- ``"compile"``: the same loop with its step (``lstm_step``, eqs 1-6) compiled by ``torch.compile``.
  The step does not depend on L or B, so one compilation serves every batch and sequence length
  (two graphs: the first step, whose zero state needs no gradient, and the others); backward is
  the compiled backward of each step.

Under autocast (bf16 on CPU or GPU, fp16 on GPU) the fused layer runs its whole recurrence in
autocast's dtype; the eager loop follows autocast op by op (matmuls low, pointwise fp32).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Tuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from models.lstm_fused import KERNELS, fused_lstm

GATES = ("g", "i", "f", "o")
BACKENDS = ("script", "eager", "compile")


class LSTM(nn.Module, PyTorchModelHubMixin, library_name="palgan", tags=["lstm", "palindromes"]):
    """``LSTM(input_dim, hidden_dim, output_dim)``: ``(B, L, D)`` -> logits ``(B, output_dim)``.

    ``backend``: ``"script"`` (the fused layer), ``"eager"`` (``lstm_loop``) or ``"compile"``
    (``lstm_loop`` with a ``torch.compile``d step). For the fused
    layer, ``kernels`` is the form of its steps, ``"auto"`` (the C++ step ops where they apply),
    ``"cpp"`` (those ops, or an error where they do not apply) or ``"script"`` (TorchScript ops
    only), and ``weight_grad_kernel`` sums the C++ path's weight gradients with the op
    ``palgan::lstm_weight_grad`` (False: MKL's addmm). Same results within rounding either way.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, backend: str = "script",
                 forget_bias: float = 1.0, kernels: str = "auto", weight_grad_kernel: bool = True):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
        self.backend, self.kernels, self.weight_grad_kernel = backend, kernels, weight_grad_kernel
        H = hidden_dim
        # The report's initialisation: N(0, 1/fan_in) weights and zero biases, except the
        # forget gate's bias (Gers et al. 2000; Jozefowicz et al. 2015): starting at f ~ 0.73
        # instead of 0.5 lets the first digit survive long sequences early in training.
        self.W_x = nn.Parameter(torch.randn(input_dim, 4 * H) / math.sqrt(input_dim))  # (D, 4H)
        self.W_h = nn.Parameter(torch.randn(H, 4 * H) / math.sqrt(H))                  # (H, 4H)
        self.b = nn.Parameter(torch.zeros(4 * H))                                       # (4H,)
        with torch.no_grad():
            self.b[2 * H:3 * H].fill_(forget_bias)
        self.W_ph = nn.Parameter(torch.randn(H, output_dim) / math.sqrt(H))             # (H, K)
        self.b_p = nn.Parameter(torch.zeros(output_dim))                                # (K,)

    def forward(self, x: Tensor, return_states: bool = False):
        """``x (B, L, D)`` -> ``p (B, K)``, and with ``return_states`` the per-step
        ``{g, i, f, o, c, h}``, each ``(B, L, H)``."""
        if self.backend == "script":                       # eqs 1-6, fused
            h, states = fused_lstm(x, self.W_x, self.W_h, self.b, return_states, self.kernels,
                                   self.weight_grad_kernel)
        else:
            xw = x @ self.W_x + self.b                     # (B, L, 4H): input part of eqs 1-4
            step = lstm_step if return_states else lstm_cell
            if self.backend == "compile":
                step = compiled(step)
            h, states = lstm_loop(xw, self.W_h, return_states, step)
        p = h @ self.W_ph + self.b_p                       # (7) h: (B, H) -> p: (B, K)
        if return_states:
            return p, dict(zip(GATES + ("c", "h"), states))
        return p

    def gate_weights(self) -> dict[str, Tensor]:
        """Per-gate weights in the report's orientation (detached copies)."""
        H = self.hidden_dim
        out = {}
        for k, gate in enumerate(GATES):
            cols = slice(k * H, (k + 1) * H)
            out[f"W_{gate}x"] = self.W_x[:, cols].detach().clone()
            out[f"W_{gate}h"] = self.W_h[:, cols].detach().clone()
            out[f"b_{gate}"] = self.b[cols].detach().clone()
        out["W_ph"] = self.W_ph.detach().clone()
        out["b_p"] = self.b_p.detach().clone()
        return out

    @torch.no_grad()
    def load_gate_weights(self, weights: dict[str, Tensor]) -> None:
        """Inverse of ``gate_weights()``."""
        H = self.hidden_dim
        for k, gate in enumerate(GATES):
            cols = slice(k * H, (k + 1) * H)
            self.W_x[:, cols].copy_(weights[f"W_{gate}x"])
            self.W_h[:, cols].copy_(weights[f"W_{gate}h"])
            self.b[cols].copy_(weights[f"b_{gate}"])
        self.W_ph.copy_(weights["W_ph"])
        self.b_p.copy_(weights["b_p"])


# --- the reference loop --------------------------------------------------------------------------

def lstm_step(xw_t: Tensor, h: Tensor, c: Tensor, W_h: Tensor) -> Tuple[Tensor, ...]:
    """One time step, eqs 1-6: ``xw_t (B, 4H)`` (the input part), ``h, c (B, H)`` ->
    ``g, i, f, o, c, h``, each ``(B, H)``."""
    gates = xw_t + h @ W_h                            # (B, 4H)
    z_g, z_i, z_f, z_o = gates.chunk(4, dim=1)        # each (B, H)
    g = torch.tanh(z_g)                               # (1)
    i = torch.sigmoid(z_i)                            # (2)
    f = torch.sigmoid(z_f)                            # (3)
    o = torch.sigmoid(z_o)                            # (4)
    c = g * i + c * f                                 # (5)
    h = torch.tanh(c) * o                             # (6)
    return g, i, f, o, c, h


def lstm_cell(xw_t: Tensor, h: Tensor, c: Tensor, W_h: Tensor) -> Tuple[Tensor, Tensor]:
    """``lstm_step`` without the gates: ``(c, h)``, all the loop needs when no states are kept."""
    *_, c, h = lstm_step(xw_t, h, c, W_h)
    return c, h


@functools.cache
def compiled(step: Callable) -> Callable:
    """``torch.compile(step)`` with dynamic shapes, made once per step function on first use (so
    that importing the model does not import the compiler). Dynamic: the batch size and the
    strides of ``xw_t``, a view of ``(B, L, 4H)`` whose stride is ``L * 4H``, change without a
    recompilation."""
    return torch.compile(step, dynamic=True)


def lstm_loop(xw: Tensor, W_h: Tensor, keep_states: bool,
              step: Callable = lstm_step) -> Tuple[Tensor, List[Tensor]]:
    """Run eqs 1-6 over time with autograd. ``xw = x W_x + b`` is ``(B, L, 4H)``; returns
    ``h_L`` and, if asked, the per-step ``[g, i, f, o, c, h]`` each ``(B, L, H)``. ``step`` is
    ``lstm_step`` or, without states, ``lstm_cell``; either one compiled, for the compile backend."""
    B, L, H4 = xw.shape
    H = H4 // 4
    h = xw.new_zeros(B, H)
    c = xw.new_zeros(B, H)
    steps: List[List[Tensor]] = [[], [], [], [], [], []]
    # unbind rather than xw[:, t] (and chunk in the step rather than slices): their backward
    # assembles the gradient once, where indexing would add a zero-filled (B, L, 4H) tensor per step.
    for xw_t in xw.unbind(1):
        *gates, c, h = step(xw_t, h, c, W_h)             # gates: g, i, f, o (none from lstm_cell)
        if keep_states:
            for k, v in enumerate([*gates, c, h]):
                steps[k].append(v)
    states: List[Tensor] = []
    if keep_states:
        states = [torch.stack(s, dim=1) for s in steps]   # each (B, L, H)
    return h, states
