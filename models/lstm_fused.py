"""The fused LSTM layer behind ``LSTM(backend="script")``: equations 1-6 over time, forward and
back-propagation through time written out by hand, in a ``torch.autograd.Function``.

``fused_lstm(x, W_x, W_h, b)`` takes the weights of ``models/lstm.py`` and returns what its
reference loop ``lstm_loop`` does. Forward: per step one matmul and one pointwise block (eqs
1-6). Backward: per step dh with one matmul and the four gates' gradients, then the weight
gradients with one matmul per few steps. Two forms of the step, chosen by ``kernels``:
- ``"cpp"``: one call of a C++ op per step (``models/csrc/lstm_cell.cpp``, built on first use,
  see ``models/lstm_kernels.py``) doing that step's matmul and its pointwise block, each thread
  on its own batch rows (``lstm_forward_cpu``, ``lstm_backward_cpu``); CPU, float32/float64;
- ``"script"``: the pointwise block as TorchScript ops, with the local derivatives stored in the
  forward (``lstm_forward``, ``lstm_backward``); any device and dtype;
- ``"auto"`` (default): ``"cpp"`` where it applies and the ops built, else ``"script"``.
Both loops are TorchScript; buffers are reused across calls (``WORKSPACE``).

Under autocast (bf16 on CPU or GPU, fp16 on GPU) the whole recurrence runs in autocast's dtype.
"""
from __future__ import annotations

import warnings
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from models import lstm_kernels

KERNELS = ("auto", "cpp", "script")   # the forms of the step, see ``cpu_step_functions``


def script(fn):
    """``torch.jit.script`` with its deprecation warning silenced.

    TorchScript is deprecated upstream in favour of torch.compile, and warns on every call.
    The product keeps it on purpose: it compiles the recurrent loop ahead of time, with no
    warm-up recompilation and no C++ toolchain, on every PyTorch this project supports, and
    the report's brief asks for it. The warning says nothing the user can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.*")
        return torch.jit.script(fn)


def compute_dtype(x: Tensor, param: Tensor) -> torch.dtype:
    """The dtype a scripted recurrence runs in: autocast's (bf16/fp16) when it is on, else the weights'.

    The scripted loops (this fused layer, the RNN's) run with autocast off and cast their inputs
    to this dtype themselves, so every matmul and pointwise op sees one dtype. Autocast does not
    reach inside an autograd.Function, and a TorchScript function differentiated by TorchScript
    keeps the backward graph of the first autocast dtype it ran under: fp16 after bf16 in one
    process fails there with a dtype mismatch.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return param.dtype


# --- buffers ----------------------------------------------------------------------------------

class Workspace:
    """Reusable buffers for the fused layers, handed out per call and given back after backward.

    Why: on a 2-core AVX-512 x86 VM a fresh multi-MB tensor costs a page fault per 4 KiB on first
    touch; without this pool that is the largest single cost of a training step, above the matmuls.
    A buffer comes back only when nothing can read it any more: at the end of a no-grad forward,
    or when autograd frees the node that saved it (after backward, once the graph is dropped;
    ``retain_graph`` keeps it out of the pool as long as the graph lives).
    """

    def __init__(self, max_keys: int = 16):
        self.free: dict[tuple, list[Tensor]] = {}
        self.max_keys = max_keys   # distinct (shape, dtype, device) kept, most recent first
        self.lent_bytes = 0        # bytes handed out and not yet given back (benchmarks read it)

    def take(self, shape: Tuple[int, ...], like: Tensor) -> Tensor:
        key = (tuple(shape), like.dtype, like.device)
        stack = self.free.get(key)
        buf = stack.pop() if stack else like.new_empty(shape)
        self.lent_bytes += buf.nbytes
        return buf

    def give(self, *buffers: Tensor) -> None:
        for buf in buffers:
            self.lent_bytes -= buf.nbytes
            key = (tuple(buf.shape), buf.dtype, buf.device)
            self.free.setdefault(key, []).append(buf)
            self.free[key] = self.free.pop(key)[-2:]          # keep two per key, move it to the end
        while len(self.free) > self.max_keys:
            self.free.pop(next(iter(self.free)))


WORKSPACE = Workspace()


# --- the TorchScript-only loop (kernels="script") ----------------------------------------------

@script
def lstm_forward(x: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor, xh: Tensor, acts: Tensor, c: Tensor,
                 tanh_c: Tensor, dz_dc: Tensor, dc_dh: Tensor, need_grad: bool) -> None:
    """Equations 1-6 over time, time-major, written into the given buffers. ``x: (L, B, D)``.

    ``xh (L+1, B, D+H)`` holds ``[x_t | h_{t-1}]`` for each step, so that the input and the
    recurrent projection of a step are one matmul against ``[W_x; W_h]`` (on this CPU a
    separate all-steps input projection with D=10 cost as much as five recurrent matmuls);
    h_t is written straight into the next row, and ``xh[L, :, D:]`` is h_L.
    Fills ``acts (L, B, 4H)`` = [g, i, f, o], ``c (L+1, B, H)`` (zero initial state at index 0)
    and ``tanh_c (L, B, H)``. With ``need_grad`` it also stores, while each step's values are
    hot in cache, the local derivatives the backward needs: ``dz_dc (L, B, 4, H)`` (of the
    pre-activations z_g, z_i, z_f w.r.t. c_t, and of z_o w.r.t. h_t) and ``dc_dh (L, B, H)``.

    tanh is computed as ``2 sigma(2z) - 1``: one sigmoid over the four gates, and a sigmoid for
    tanh(c), cost less on CPU than torch.tanh (measured on a 2-core AVX-512 x86 VM).
    """
    L, B, D = x.shape
    H = W_h.shape[0]
    two = torch.ones(4 * H, dtype=x.dtype, device=x.device)
    two[:H] = 2.0                                            # doubles the g columns: sigma(2 z_g)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    # [W_x; W_h] enters as the transpose of a contiguous (4H, D+H) matrix, as in F.linear,
    # which MKL runs faster for these shapes than the plain layout.
    W = (torch.cat([W_x, W_h]) * two).t().contiguous().t()  # (D+H, 4H)
    b2 = b * two
    xh[:L, :, :D].copy_(x)
    xh[0, :, D:].zero_()                                     # h_0 = 0
    c[0].zero_()                                             # c_0 = 0
    # (In-place ops with a float operand, like x.mul_(2.0), cost a tensor conversion per call
    # in TorchScript; x.add_(x) and addcmul with a ``one`` tensor do not.)
    for t in range(L):
        a = acts[t]                                          # (B, 4H)
        torch.addmm(b2, xh[t], W, out=a)                     # z = x_t W_x + h_{t-1} W_h + b
        a.sigmoid_()                                         # sigma(2 z_g), i, f, o   (2-4)
        if need_grad:
            torch.addcmul(a, a, a, value=-1.0, out=dz_dc[t].view(B, 4 * H))   # sigma' = a - a^2
        g, i, f, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        g.add_(g).sub_(one)                                  # g = 2 sigma(2 z_g) - 1   (1)
        c_t = c[t + 1]
        torch.mul(c[t], f, out=c_t).addcmul_(g, i)           # c = c_{t-1} f + g i      (5)
        tc = tanh_c[t]
        torch.add(c_t, c_t, out=tc).sigmoid_()
        tc.add_(tc).sub_(one)                                # tanh(c) = 2 sigma(2c) - 1
        torch.mul(tc, o, out=xh[t + 1, :, D:])               # h = tanh(c) o            (6)
        if need_grad:
            d = dz_dc[t]                                     # (B, 4, H), sigma' of each gate
            torch.addcmul(one, g, g, value=-1.0, out=d[:, 0]).mul_(i)   # dz_g/dc = i (1 - g^2)
            d[:, 1].mul_(g)                                  # dz_i/dc = g i (1 - i)
            d[:, 2].mul_(c[t])                               # dz_f/dc = c_{t-1} f (1 - f)
            d[:, 3].mul_(tc)                                 # dz_o/dh = tanh(c) o (1 - o)
            torch.addcmul(one, tc, tc, value=-1.0, out=dc_dh[t]).mul_(o)   # dc/dh = o (1 - tanh^2 c)


@script
def lstm_backward(dh_seq: Optional[Tensor], dh_last: Optional[Tensor], W_x: Tensor, W_h: Tensor,
                  xh: Tensor, acts: Tensor, dz_dc: Tensor, dc_dh: Tensor, dz: Tensor,
                  need_dx: bool) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """Back-propagation through time for ``lstm_forward``, into the buffer ``dz (L, B, 4H)``.

    ``dh_seq (L, B, H)`` is the gradient reaching every h_t from outside, ``dh_last (B, H)`` the
    one reaching h_L (either may be None). Returns dL/dx (time-major), dL/dW_x, dL/dW_h, dL/db.
    """
    L, B, H4 = acts.shape
    H = H4 // 4
    D = W_x.shape[0]
    f = acts[:, :, 2 * H:3 * H]
    W_hT = W_h.t().contiguous()
    dz_flat = dz
    dz = dz.view(L, B, 4, H)
    dh = xh.new_zeros(B, H)
    if dh_last is not None:
        dh = dh_last
    if dh_seq is not None:
        dh = dh + dh_seq[L - 1]
    dc = dh * dc_dh[L - 1]
    for t in range(L - 1, -1, -1):
        if t < L - 1:
            # dh_t = (from outside) + dz_{t+1} W_h^T;   dc_t = dc_{t+1} f_{t+1} + dh_t dc_t/dh_t
            if dh_seq is not None:
                dh = torch.addmm(dh_seq[t], dz_flat[t + 1], W_hT)
            else:
                dh = torch.mm(dz_flat[t + 1], W_hT)
            dc = torch.addcmul(dc * f[t + 1], dh, dc_dh[t])
        torch.mul(dc.unsqueeze(1), dz_dc[t, :, :3], out=dz[t, :, :3])   # dz_g, dz_i, dz_f
        torch.mul(dh, dz_dc[t, :, 3], out=dz[t, :, 3])                  # dz_o
    dz_2d = dz.view(L * B, 4 * H)
    dW = torch.mm(xh[:L].reshape(L * B, D + H).t(), dz_2d)    # sum_t [x_t | h_{t-1}]^T dz_t
    db = dz_2d.sum(0)
    dx: Optional[Tensor] = None
    if need_dx:
        dx = torch.mm(dz_2d, W_x.t()).view(L, B, D)
    return dx, dW[:D], dW[D:], db


# --- the loop of C++ step ops (kernels="cpp") -------------------------------------------------

def lstm_forward_cpu(x: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor, W: Tensor, z: Tensor, xh: Tensor,
                     acts: Tensor, c: Tensor, tanh_c: Tensor, split: bool) -> None:
    """``lstm_forward`` with each step one call of the C++ op ``palgan::lstm_step_forward``: the
    step's matmul and its pointwise block (eqs 1-6, with the bias), split over threads by batch
    rows, writing the next step's input row ``[x_{t+1} | h_t]``.

    With ``split`` (a small input, see ``SMALL_INPUT``) the matmul is ``h_{t-1} W_h`` and the op
    adds ``x_t W_x`` row by row, skipping zero inputs (one-hot digits: one row of W_x); otherwise it
    is ``[x_t | h_{t-1}] @ [W_x; W_h]``, the two weights concatenated into the buffer
    ``W (D+H, 4H)``. ``z (B, 4H)`` is a buffer too. Fills xh, acts, c and tanh_c as
    ``lstm_forward`` does (the backward recomputes its local derivatives from them), or, when they
    are rings of 2, 1, 2 and 1 rows (inference), cycles through them."""
    L, B, D = x.shape
    if split:
        weight, W_x_rows = W_h.contiguous(), W_x.contiguous()
    else:
        torch.cat([W_x, W_h], out=W)                         # (D+H, 4H)
        weight, W_x_rows = W, x.new_empty(0)
    b = b.contiguous()
    xh[0, :, :D].copy_(x[0])
    xh[0, :, D:].zero_()                                     # h_0 = 0
    c[0].zero_()                                             # c_0 = 0
    for t in range(L):
        torch.ops.palgan.lstm_step_forward(weight, W_x_rows, z, acts, b, c, tanh_c, xh, x, t)   # eqs 1-6


def lstm_backward_cpu(dh_seq: Optional[Tensor], dh_last: Optional[Tensor], W_x: Tensor, W_h: Tensor,
                      xh: Tensor, acts: Tensor, c: Tensor, tanh_c: Tensor, dz: Tensor, W_hT: Tensor,
                      db_parts: Tensor, dW: Tensor, xhT: Tensor, need_dx: bool) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """Back-propagation through time for ``lstm_forward_cpu``, each step one call of
    ``palgan::lstm_step_backward``: dh_t with one matmul, ``dz_{t+1} W_h^T``, then the step's
    gate gradients, the carried dc, and their sum over the batch (the bias gradient).

    The gate gradients live in ``dz (K, B, 4H)``, a ring of the last K steps small enough to stay
    in cache: each time K steps are done, their share of the weight gradient is added in one
    matmul, ``dW += [x_t | h_{t-1}]^T dz_t`` over those steps: ``palgan::lstm_weight_grad``, the
    micro-kernel after transposing those rows of xh into the scratch ``xhT`` (flat, at least
    ``(D+H) K B``), or with an empty ``xhT`` MKL's addmm. ``db_parts (P, 4H)`` holds the op's
    partial sums of the bias gradient; ``W_hT (4H, H)`` is a buffer too, and ``dW (D+H, 4H)`` a
    fresh tensor whose two blocks are handed out as the gradients. (Summing ``x_t^T dz_t`` in the
    step op, skipping zero inputs, as the forward does, measured no faster.)
    Returns dL/dx, dL/dW_x, dL/dW_h, dL/db."""
    L, B, H4 = acts.shape
    H = H4 // 4
    D = W_x.shape[0]
    K = dz.shape[0]
    W_hT.copy_(W_h.t())                                      # (4H, H)
    db_parts.zero_()
    dx = xh.new_empty(L, B, D) if need_dx else xh.new_empty(0)
    dc = xh.new_zeros(B, H)                                  # reaches c_t through c_{t+1}
    dh = xh.new_zeros(B, H)                                  # reaches h_t
    if dh_last is not None:
        dh.copy_(dh_last)
    if dh_seq is not None:
        dh.add_(dh_seq[L - 1])
    none = xh.new_empty(0)
    for t in range(L - 1, -1, -1):
        dh_out = none                                        # the gradient reaching h_t from outside
        if dh_seq is not None and t < L - 1:
            dh_out = dh_seq[t]
        torch.ops.palgan.lstm_step_backward(W_hT, dz, dh, dh_out, acts, c, tanh_c, dc, db_parts, t)
        if t % K == 0:                                       # steps t .. t+n-1 sit in dz[0:n]
            n = min(K, L - t)
            dz_chunk = dz[:n].view(n * B, 4 * H)
            xh_chunk = xh[t:t + n].view(n * B, D + H)
            if xhT.numel() != 0:                             # dW (+)= sum [x_t | h_{t-1}]^T dz_t
                torch.ops.palgan.lstm_weight_grad(xh_chunk, dz_chunk, dW, xhT[:(D + H) * n * B].view(D + H, n * B),
                                                  t + n < L)
            elif t + n == L:                                 # the first chunk: dW = ...
                torch.mm(xh_chunk.t(), dz_chunk, out=dW)
            else:
                dW.addmm_(xh_chunk.t(), dz_chunk)
            if need_dx:
                torch.mm(dz_chunk, W_x.t(), out=dx[t:t + n].view(n * B, D))
    db = db_parts.sum(0)
    return (dx if need_dx else None), dW[:D], dW[D:], db


SMALL_INPUT = 32          # up to this input size the step op adds x_t W_x itself, skipping zeros
DZ_RING_FLOATS = 1 << 18  # the backward's ring of gate gradients: about 1 MB in float32, so it stays in L2
DB_PARTS = 8              # partial sums of the bias gradient: fixed, so results do not depend on threads
_cpu_step_functions: list = []


def cpu_step_functions(x: Tensor, kernels: str = "auto"):
    """The scripted ``(lstm_forward_cpu, lstm_backward_cpu)`` when the C++ step ops run ``x``, else
    None (the TorchScript-only loop). They apply on CPU to float32 and float64 (bf16 runs the
    TorchScript-only loop) once built; ``kernels="cpp"`` makes their absence an error.
    Scripted on first use: TorchScript resolves ``torch.ops.palgan`` only once the ops are loaded."""
    if kernels == "script":
        return None
    step_functions = None
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        if not _cpu_step_functions:
            _cpu_step_functions.append(
                (script(lstm_forward_cpu), script(lstm_backward_cpu)) if lstm_kernels.available() else None)
        step_functions = _cpu_step_functions[0]
        if step_functions is None and kernels == "cpp":
            raise RuntimeError("kernels='cpp': the C++ LSTM step ops are not built in this process "
                               f"(see models/lstm_kernels.py, {lstm_kernels.ENV_SWITCH})")
    elif kernels == "cpp":
        raise RuntimeError(f"kernels='cpp': the C++ LSTM step ops run float32/float64 on CPU, "
                           f"not {x.dtype} on {x.device.type}")
    return step_functions


# --- the layer ----------------------------------------------------------------------------------

def lstm_inference(x: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor, kernels: str = "auto") -> Tensor:
    """h_L of the fused layer without autograd (``x (L, B, D)`` time-major). With the C++ kernels
    the buffers are rings that stay in cache: only what the next step reads is kept."""
    L, B, D = x.shape
    H = W_h.shape[0]
    step_functions = cpu_step_functions(x, kernels)
    if step_functions is not None:
        bufs = [WORKSPACE.take(shape, x) for shape in ((2, B, D + H), (1, B, 4 * H), (2, B, H), (1, B, H),
                                                       (D + H, 4 * H), (B, 4 * H))]
        xh, acts, c, tanh_c, W, z = bufs
        step_functions[0](x, W_x, W_h, b, W, z, xh, acts, c, tanh_c, D <= SMALL_INPUT)
        h_last = xh[L % 2, :, D:].clone()
    else:
        bufs = [WORKSPACE.take(shape, x) for shape in ((L + 1, B, D + H), (L, B, 4 * H), (L + 1, B, H), (L, B, H))]
        xh, acts, c, tanh_c = bufs
        none = x.new_empty(0)
        lstm_forward(x, W_x, W_h, b, xh, acts, c, tanh_c, none, none, False)
        h_last = xh[L, :, D:].clone()
    WORKSPACE.give(*bufs)
    return h_last


class LSTMFunction(torch.autograd.Function):
    """``(x (L,B,D), W_x, W_h, b) -> h_L (B,H)``, or with ``keep_states``
    ``(h_L, h_1..h_L (L,B,H), [g,i,f,o] (L,B,4H), c (L+1,B,H))`` (the last two not differentiable).

    All inputs share one dtype. Buffers come from ``WORKSPACE`` unless states are returned
    (then the caller owns them). Two loops (``kernels``, see ``cpu_step_functions``): the
    C++-kernel one (CPU, float32/64), which keeps xh, acts, c and tanh_c for its backward and
    sums its weight gradients with ``palgan::lstm_weight_grad`` (``weight_grad_kernel``) or MKL's
    addmm, and the TorchScript-only one, which keeps xh, acts and the local derivatives dz_dc, dc_dh.
    """

    @staticmethod
    def forward(ctx, x, W_x, W_h, b, keep_states: bool, need_grad: bool, kernels: str = "auto",
                weight_grad_kernel: bool = True):
        # need_grad: grad mode was on and an input requires grad (ctx.needs_input_grad alone
        # does not see torch.no_grad()); without it no derivative buffers are filled.
        L, B, D = x.shape
        H = W_h.shape[0]
        if not (need_grad or keep_states):
            return lstm_inference(x, W_x, W_h, b, kernels)
        take = (lambda shape: x.new_empty(shape)) if keep_states else (lambda shape: WORKSPACE.take(shape, x))
        step_functions = cpu_step_functions(x, kernels)
        if step_functions is not None:
            xh, acts, c, tanh_c = take((L + 1, B, D + H)), take((L, B, 4 * H)), take((L + 1, B, H)), take((L, B, H))
            W, z = WORKSPACE.take((D + H, 4 * H), x), WORKSPACE.take((B, 4 * H), x)
            step_functions[0](x, W_x, W_h, b, W, z, xh, acts, c, tanh_c, D <= SMALL_INPUT)
            WORKSPACE.give(W, z)
            buffers, saved, backward_loop = [xh, acts, c, tanh_c], (xh, acts, c, tanh_c), step_functions[1]
        else:
            xh, acts, c, tanh_c = take((L + 1, B, D + H)), take((L, B, 4 * H)), take((L + 1, B, H)), take((L, B, H))
            grad_bufs = (take((L, B, 4, H)), take((L, B, H))) if need_grad else (x.new_empty(0), x.new_empty(0))
            lstm_forward(x, W_x, W_h, b, xh, acts, c, tanh_c, *grad_bufs, need_grad)
            buffers, saved, backward_loop = [xh, acts, c, tanh_c], (xh, acts, *grad_bufs), lstm_backward
            buffers += grad_bufs if need_grad else []
        h_seq = xh[1:, :, D:]                                 # (L, B, H)
        h_last = h_seq[L - 1].clone()
        ctx.set_materialize_grads(False)
        if need_grad:
            ctx.save_for_backward(W_x, W_h)
            ctx.buffers, ctx.backward_loop = saved, backward_loop
            ctx.weight_grad_kernel = weight_grad_kernel
            if not keep_states:   # back to the pool when autograd frees this node (and its graph)
                weakref.finalize(ctx, WORKSPACE.give, *buffers)
        elif not keep_states:
            WORKSPACE.give(*buffers)
        if not keep_states:
            return h_last
        ctx.mark_non_differentiable(acts, c)
        return h_last, h_seq, acts, c

    @staticmethod
    @torch.autograd.function.once_differentiable   # the hand-written BPTT has no graph of its own
    def backward(ctx, dh_last, dh_seq=None, _dacts=None, _dc=None):
        W_x, W_h = ctx.saved_tensors
        xh, acts = ctx.buffers[:2]
        dx = dW_x = dW_h = db = None
        if dh_last is not None or dh_seq is not None:
            if ctx.backward_loop is lstm_backward:
                dz = WORKSPACE.take(acts.shape, xh)
                dx, dW_x, dW_h, db = lstm_backward(dh_seq, dh_last, W_x, W_h, *ctx.buffers, dz,
                                                   ctx.needs_input_grad[0])
                WORKSPACE.give(dz)
            else:
                L, B, H4 = acts.shape
                D, H = W_x.shape[0], H4 // 4
                K = max(1, min(L, DZ_RING_FLOATS // (B * H4)))
                dz, W_hT = WORKSPACE.take((K, B, H4), xh), WORKSPACE.take((H4, H), xh)
                db_parts = WORKSPACE.take((DB_PARTS, H4), xh)
                dW = xh.new_empty(D + H, H4)     # handed out as the gradients: not from the pool
                use_op = ctx.weight_grad_kernel
                xhT = WORKSPACE.take(((D + H) * K * B,), xh) if use_op else xh.new_empty(0)   # empty: addmm
                dx, dW_x, dW_h, db = ctx.backward_loop(dh_seq, dh_last, W_x, W_h, *ctx.buffers, dz, W_hT,
                                                       db_parts, dW, xhT, ctx.needs_input_grad[0])
                WORKSPACE.give(dz, W_hT, db_parts)
                if use_op:
                    WORKSPACE.give(xhT)
        return dx, dW_x, dW_h, db, None, None, None, None


def fused_lstm(x: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor, keep_states: bool = False,
               kernels: str = "auto", weight_grad_kernel: bool = True) -> Tuple[Tensor, List[Tensor]]:
    """Eqs 1-6 over time for ``x (B, L, D)``, as ``lstm_loop`` of ``models/lstm.py`` computes them:
    returns ``h_L (B, H)`` and, if asked, the per-step ``[g, i, f, o, c, h]`` each ``(B, L, H)``.

    Runs with autocast off, in ``compute_dtype`` (bf16/fp16 under autocast).
    """
    dtype = compute_dtype(x, W_h)
    with torch.autocast(x.device.type, enabled=False):
        inputs = (x.transpose(0, 1).to(dtype), W_x.to(dtype), W_h.to(dtype), b.to(dtype))   # x: (L, B, D)
        need_grad = torch.is_grad_enabled() and any(v.requires_grad for v in inputs)
        if need_grad or keep_states:
            out = LSTMFunction.apply(*inputs, keep_states, need_grad, kernels, weight_grad_kernel)
        else:
            out = lstm_inference(*inputs, kernels)
    if not keep_states:
        return out, []
    h_last, h_seq, acts, c = out
    H = W_h.shape[0]
    per_gate = [acts[:, :, k * H:(k + 1) * H] for k in range(4)]           # g, i, f, o: (L, B, H)
    return h_last, [v.transpose(0, 1) for v in per_gate + [c[1:], h_seq]]  # each (B, L, H)
