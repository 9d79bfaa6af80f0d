"""How fast is each LSTM on this machine? Forward pass and one full RMSprop training step.

    python benchmarks/lstm_speed.py                          # CPU, fp32, the three sizes below
    python benchmarks/lstm_speed.py --sizes 128,128,20 --rounds 30
    python benchmarks/lstm_speed.py --device cuda --precision bf16 --json runs/bench/lstm_cuda_bf16.json

Variants, all built on the same weights (one-hot 10-d input, 10 classes, like the trainer):
  report-loop  the report's eager loop: one matmul per gate and per step, autograd through it
  eager        this repo's ``LSTM(backend="eager")``: the same loop with the 4 gates in one matmul
  script       ``LSTM(backend="script")``: the fused layer, TorchScript time loops (forward and
               hand-written BPTT) calling one C++ op per step (matmul + pointwise block)
  script-ts    the same fused layer with its pointwise blocks as TorchScript ops (the path it
               takes on GPU, in bf16/fp16, or without a C++ compiler), to show what the kernels add
  compile      ``LSTM(backend="compile")``: the eager loop with its step compiled by ``torch.compile``
               (compile time is reported, not timed)
  nn.LSTM      ``torch.nn.LSTM`` + ``nn.Linear`` (oneDNN on CPU, cuDNN on GPU): the baseline

The training step is the trainer's: forward, cross-entropy, zero_grad, backward, clip the gradient
norm at 10, ``RMSprop.step``. The variants run interleaved, round after round, and the table shows
medians, so a busy machine slows them all alike. The matmul peak of the machine (a 1024^3 matmul in
the same precision) is measured in the same rounds.
Memory: "saved MB" is what one training forward keeps for its backward (the tensors autograd
saves, plus the fused layer's workspace buffers), on every device; on CUDA also the peak
allocated memory of one training step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import lstm_kernels
from models.lstm import LSTM
from models.lstm_fused import WORKSPACE
from trainers.files import write_text_atomic

INPUT_DIM = 10      # one-hot digits, as in the trainer
NUM_CLASSES = 10
CLIP_NORM = 10.0    # the trainer's default
SIZES = ((128, 128, 20), (128, 128, 100), (64, 256, 50))   # (B, H, T): short T, long T, wide H
VARIANTS = ("report-loop", "eager", "script", "script-ts", "compile", "nn.LSTM")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ReportLoopLSTM(nn.Module):
    """The report's forward: eight matmuls per step, one per gate and input, weights per gate."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.w = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in weights.items()})

    def forward(self, x):
        w = self.w
        h = x.new_zeros(x.shape[0], w["W_gh"].shape[0])
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            x_t = x[:, t]
            g = torch.tanh(x_t @ w["W_gx"] + h @ w["W_gh"] + w["b_g"])
            i = torch.sigmoid(x_t @ w["W_ix"] + h @ w["W_ih"] + w["b_i"])
            f = torch.sigmoid(x_t @ w["W_fx"] + h @ w["W_fh"] + w["b_f"])
            o = torch.sigmoid(x_t @ w["W_ox"] + h @ w["W_oh"] + w["b_o"])
            c = g * i + c * f
            h = torch.tanh(c) * o
        return h @ w["W_ph"] + w["b_p"]


class TorchLSTM(nn.Module):
    """``nn.LSTM`` + ``nn.Linear`` on the last step, weights copied from ours."""

    def __init__(self, weights: dict[str, torch.Tensor], D: int, H: int):
        super().__init__()
        self.lstm = nn.LSTM(D, H, batch_first=True)
        self.head = nn.Linear(H, NUM_CLASSES)
        order = ("i", "f", "g", "o")          # nn.LSTM's gate order
        with torch.no_grad():
            self.lstm.weight_ih_l0.copy_(torch.cat([weights[f"W_{k}x"].T for k in order]))
            self.lstm.weight_hh_l0.copy_(torch.cat([weights[f"W_{k}h"].T for k in order]))
            self.lstm.bias_ih_l0.copy_(torch.cat([weights[f"b_{k}"] for k in order]))
            self.lstm.bias_hh_l0.zero_()
            self.head.weight.copy_(weights["W_ph"].T)
            self.head.bias.copy_(weights["b_p"])

    def forward(self, x):
        out, _ = self.lstm(x)                  # (B, T, H)
        return self.head(out[:, -1])


def build(variant: str, reference: LSTM, device: torch.device) -> nn.Module:
    w = reference.gate_weights()
    D, H = reference.input_dim, reference.hidden_dim
    if variant == "report-loop":
        model = ReportLoopLSTM(w)
    elif variant == "nn.LSTM":
        model = TorchLSTM(w, D, H)
    else:
        backend = "script" if variant.startswith("script") else variant   # eager, compile
        model = LSTM(D, H, NUM_CLASSES, backend=backend, kernels="script" if variant == "script-ts" else "auto")
        model.load_gate_weights(w)
    return model.to(device)


def model_flops(B: int, H: int, T: int, training: bool) -> float:
    """Matmul FLOPs that no variant can skip: the gates of every step (input and recurrent part)
    and the head; a training step adds the weight gradients (as many again) and dh through W_h for
    T-1 steps (the input needs no gradient)."""
    forward = 2 * B * T * 4 * H * (INPUT_DIM + H) + 2 * B * H * NUM_CLASSES
    if not training:
        return forward
    return 2 * forward + 2 * B * (T - 1) * 4 * H * H + 2 * B * NUM_CLASSES * H


class Bench:
    def __init__(self, device: torch.device, precision: str, clock: str):
        self.device = device
        self.dtype = PRECISIONS[precision]
        # wall: elapsed time. cpu: CPU time of this process (all its threads), which a busy
        # shared machine inflates less; with --threads 1 it is the work itself.
        self.clock = time.perf_counter if clock == "wall" else time.process_time

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeat: int) -> float:
        """Seconds per call, averaged over ``repeat`` back-to-back calls."""
        self.sync()
        t0 = self.clock()
        for _ in range(repeat):
            fn()
        self.sync()
        return (self.clock() - t0) / repeat


def make_step(bench: Bench, model: nn.Module, x, y):
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)

    def train_step():
        with bench.autocast():
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()

    @torch.no_grad()
    def forward():
        with bench.autocast():
            model(x)

    return train_step, forward


def saved_bytes(bench: Bench, model: nn.Module, x, y) -> int:
    """Bytes kept from the forward for the backward of one training step: the tensors autograd
    saves (distinct storages), plus the workspace buffers the fused layer holds for its backward."""
    seen: dict[tuple, int] = {}
    lent_before = WORKSPACE.lent_bytes

    def pack(t):
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with bench.autocast():
            loss = F.cross_entropy(model(x).float(), y)
    workspace = WORKSPACE.lent_bytes - lent_before
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return workspace + sum(n for (ptr, _), n in seen.items() if ptr not in params)


def cuda_peak_bytes(bench: Bench, step) -> int | None:
    if bench.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def matmul_peak(bench: Bench, n: int = 1024) -> float:
    """GFLOP/s of an n^3 matmul in the benchmark's precision."""
    dtype = bench.dtype or torch.float32
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    seconds = bench.timed(lambda: a @ b, repeat=3 if bench.device.type == "cpu" else 20)
    return 2 * n ** 3 / seconds / 1e9


def run_size(bench: Bench, size, variants, rounds: int, warmup: int, log) -> tuple[list[dict], list[float]]:
    B, H, T = size
    device = bench.device
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = LSTM(INPUT_DIM, H, NUM_CLASSES)
    x = F.one_hot(torch.randint(0, INPUT_DIM, (B, T), generator=gen), INPUT_DIM).float().to(device)
    y = torch.randint(0, NUM_CLASSES, (B,), generator=gen).to(device)

    models, steps, compile_s = {}, {}, {}
    for v in list(variants):
        t0 = time.perf_counter()
        try:
            models[v] = build(v, reference, device)
            steps[v] = make_step(bench, models[v], x, y)
            for _ in range(warmup):           # also compiles (compile, script's profiling runs)
                steps[v][0]()
                steps[v][1]()
            bench.sync()
        except Exception as err:              # e.g. torch.compile without a working toolchain
            if v != "compile":
                raise
            log(f"  compile: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); left out")
            variants = [u for u in variants if u != v]
            continue
        compile_s[v] = time.perf_counter() - t0
        log(f"  {v}: built and warmed up in {compile_s[v]:.1f}s")

    # Enough calls per measurement for ~20 ms of work, so timer and scheduler noise stay small.
    probe = bench.timed(steps["nn.LSTM" if "nn.LSTM" in steps else variants[0]][0], 1)
    repeat = max(1, min(20, int(0.02 / max(probe, 1e-6))))
    times = {(v, m): [] for v in variants for m in ("train", "forward")}
    peaks = []
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))   # no fixed position
        for v in order:
            train_step, forward = steps[v]
            times[(v, "train")].append(bench.timed(train_step, repeat))
            times[(v, "forward")].append(bench.timed(forward, repeat))
        peaks.append(matmul_peak(bench))
    peak = statistics.median(peaks)

    rows = []
    for mode in ("forward", "train"):
        med = {v: statistics.median(times[(v, mode)]) for v in variants}
        flops = model_flops(B, H, T, mode == "train")
        for v in variants:
            row = {"B": B, "H": H, "T": T, "mode": mode, "variant": v,
                   "ms": 1e3 * med[v],
                   "ms_iqr": 1e3 * iqr(times[(v, mode)]),
                   "vs_nn_lstm": med[v] / med["nn.LSTM"] if "nn.LSTM" in med else None,
                   "vs_report_loop": med[v] / med["report-loop"] if "report-loop" in med else None,
                   "vs_eager": med[v] / med["eager"] if "eager" in med else None,
                   "gflops": flops / med[v] / 1e9, "matmul_peak_gflops": peak,
                   "matmul_floor_ms": 1e3 * flops / (peak * 1e9),
                   "warmup_s": compile_s[v]}
            if mode == "train":
                row["saved_for_backward_mb"] = saved_bytes(bench, models[v], x, y) / 2 ** 20
                cuda_peak = cuda_peak_bytes(bench, steps[v][0])
                row["cuda_peak_mb"] = None if cuda_peak is None else cuda_peak / 2 ** 20
            rows.append(row)
    return rows, peaks


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[2] - q[0]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'B,H,T':>12} {'mode':>7} {'variant':>12} {'ms':>8} {'IQR':>6} {'/nn.LSTM':>8} "
            f"{'/report':>8} {'/eager':>7} {'GFLOP/s':>8} {'peak':>6} {'saved MB':>8} {'cuda MB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['B']:>4},{r['H']:>3},{r['T']:>3} {r['mode']:>7} {r['variant']:>12} {r['ms']:8.2f} "
              f"{r['ms_iqr']:6.2f} {fmt(r['vs_nn_lstm'], '8.2f')} {fmt(r['vs_report_loop'], '8.2f')} "
              f"{fmt(r['vs_eager'], '7.2f')} {r['gflops']:8.1f} {r['matmul_peak_gflops']:6.0f} "
              f"{fmt(r.get('saved_for_backward_mb'), '8.1f')} {fmt(r.get('cuda_peak_mb'), '8.1f')}")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def variants_first(variants) -> str:
    return list(variants)[0]


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        B, H, T = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is B,H,T (three integers), got {text!r}")
    if min(B, H, T) < 1:
        raise argparse.ArgumentTypeError(f"B, H and T must be positive, got {text!r}")
    return B, H, T


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=list(SIZES), help="B,H,T triples")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the table shows medians")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="autocast precision")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall time, or the process's CPU time (steadier on a shared machine)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":   # the fp32 rows compare true fp32, not TF32, on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.clock == "cpu" and device.type == "cuda":
        p.error("--clock cpu measures CPU work; use the wall clock with --device cuda")
    bench = Bench(device, args.precision, args.clock)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731

    where = machine(device)
    kernels = (f"C++ step kernels built ({lstm_kernels.cpu_capability()})" if device.type == "cpu" and
               lstm_kernels.available() else "no C++ step kernels: script = script-ts")
    print(f"# {where}; torch {torch.__version__}; precision {args.precision}; "
          f"{args.clock} clock; {args.rounds} interleaved rounds, medians; {kernels}")
    rows = []
    for size in args.sizes:
        log(f"size B,H,T = {size}")
        size_rows, _ = run_size(bench, size, args.variants, args.rounds, args.warmup, log)
        rows += size_rows
    print_table(rows)
    for r in rows:
        if r["variant"] == variants_first(args.variants):
            print(f"# {r['B']},{r['H']},{r['T']} {r['mode']}: the matmuls alone, at the measured peak, "
                  f"take {r['matmul_floor_ms']:.2f} ms")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": where, "kernels": kernels, "device": args.device, "precision": args.precision,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds, "clock": args.clock,
                "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_text_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
        log(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
