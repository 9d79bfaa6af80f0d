"""The vanilla RNN baseline, with the LSTM's API.

    h_t = tanh(x_t W_hx + h_{t-1} W_hh + b_h)
    p   = h_L W_ph + b_p                       (logits of the last step)

``init`` sets W_hh, the weights a gradient crosses at every step back in time:
- "default": N(0, 1/H), as the input and output weights;
- "orthogonal": a random orthogonal matrix (Saxe et al. 2014), every singular value 1, so the
  linear part of the recurrence neither grows nor shrinks a gradient;
- "identity": W_hh = I, the IRNN initialisation of Le et al. (2015). Their recurrence is a ReLU;
  here it stays tanh, so the identity holds h exactly only where tanh is linear (small h), and
  tanh' <= 1 shrinks it elsewhere: h_t = tanh(h_{t-1} + x_t W_hx + b_h) starts as a leaky sum.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from models.lstm import BACKENDS, compiled
from models.lstm_fused import compute_dtype, script

RNN_INITS = ("default", "orthogonal", "identity")


def rnn_loop(xw: Tensor, W_hh: Tensor, keep_states: bool) -> Tuple[Tensor, List[Tensor]]:
    """``xw = x W_hx + b_h`` is ``(B, L, H)``; returns ``h_L`` and, if asked, ``[h]`` as ``(B, L, H)``."""
    B, L, H = xw.shape
    h = xw.new_zeros(B, H)
    hs: List[Tensor] = []
    for xw_t in xw.unbind(1):                # unbind: one gradient assembly, not one per step
        h = torch.tanh(xw_t + h @ W_hh)       # (B, H)
        if keep_states:
            hs.append(h)
    states: List[Tensor] = []
    if keep_states:
        states = [torch.stack(hs, dim=1)]
    return h, states


rnn_loop_script = script(rnn_loop)


def rnn_step(xw_t: Tensor, h: Tensor, W_hh: Tensor) -> Tensor:
    """One step: ``xw_t (B, H)`` (the input part), ``h (B, H)`` -> the next ``h``."""
    return torch.tanh(xw_t + h @ W_hh)


def rnn_loop_compiled(xw: Tensor, W_hh: Tensor, keep_states: bool) -> Tuple[Tensor, List[Tensor]]:
    """``rnn_loop`` with its step compiled by ``torch.compile`` (once for every L)."""
    step, h, hs = compiled(rnn_step), xw.new_zeros(xw.shape[0], xw.shape[2]), []
    for xw_t in xw.unbind(1):
        h = step(xw_t, h, W_hh)               # (B, H)
        if keep_states:
            hs.append(h)
    return h, [torch.stack(hs, dim=1)] if keep_states else []


class RNN(nn.Module, PyTorchModelHubMixin, library_name="palgan", tags=["rnn", "palindromes"]):
    """``RNN(input_dim, hidden_dim, output_dim)``: ``(B, L, D)`` -> logits ``(B, output_dim)``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, backend: str = "script",
                 init: str = "default"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if init not in RNN_INITS:
            raise ValueError(f"init must be one of {RNN_INITS}, got {init!r}")
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
        self.backend = backend
        self.W_hx = nn.Parameter(torch.randn(input_dim, hidden_dim) / math.sqrt(input_dim))    # (D, H)
        self.W_hh = nn.Parameter(torch.randn(hidden_dim, hidden_dim) / math.sqrt(hidden_dim))  # (H, H)
        self.b_h = nn.Parameter(torch.zeros(hidden_dim))
        self.W_ph = nn.Parameter(torch.randn(hidden_dim, output_dim) / math.sqrt(hidden_dim))  # (H, K)
        self.b_p = nn.Parameter(torch.zeros(output_dim))
        with torch.no_grad():   # after the draws above, so the other weights are the same for every init
            if init == "orthogonal":
                nn.init.orthogonal_(self.W_hh)
            elif init == "identity":
                self.W_hh.copy_(torch.eye(hidden_dim))

    def forward(self, x: Tensor, return_states: bool = False):
        if self.backend == "script":
            # Autocast off, explicit casts, as in the fused LSTM (see ``compute_dtype``).
            dtype = compute_dtype(x, self.W_hh)
            with torch.autocast(x.device.type, enabled=False):
                W_hx, W_hh, b_h = self.W_hx.to(dtype), self.W_hh.to(dtype), self.b_h.to(dtype)
                xw = x.to(dtype) @ W_hx + b_h                        # (B, L, H)
                h, states = rnn_loop_script(xw, W_hh, return_states)  # (B, H)
        else:
            xw = x @ self.W_hx + self.b_h                    # (B, L, H)
            loop = rnn_loop_compiled if self.backend == "compile" else rnn_loop
            h, states = loop(xw, self.W_hh, return_states)
        p = h @ self.W_ph + self.b_p                     # (B, K)
        if return_states:
            return p, {"h": states[0]}
        return p

    def gate_weights(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach().clone() for k in ("W_hx", "W_hh", "b_h", "W_ph", "b_p")}

    @torch.no_grad()
    def load_gate_weights(self, weights: dict[str, Tensor]) -> None:
        for k in ("W_hx", "W_hh", "b_h", "W_ph", "b_p"):
            getattr(self, k).copy_(weights[k])
