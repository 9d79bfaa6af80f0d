"""Does the fused LSTM's weight-gradient op pay off? Two measurements, CPU, fp32:

    python benchmarks/lstm_weight_grad.py                 # 1 and 2 threads
    python benchmarks/lstm_weight_grad.py --threads 1 --rounds 21

1. The op alone: ``palgan::lstm_weight_grad`` (xh transposed into scratch, then oneDNN's brgemm
   micro-kernel, threads on columns of dW) against MKL's ``dW.addmm_(xh.t(), dz)``, at the
   backward's shape for (B, H, T) = (128, 128, 20): 4 steps of 128 rows, D+H = 138, 4H = 512.
2. The whole training step of the trainer (forward, cross-entropy, backward, clipping at 10,
   RMSprop) with the op and with addmm (``LSTM(..., weight_grad_kernel=False)``), interleaved with
   ``nn.LSTM`` + ``nn.Linear`` on the same weights, round after round; medians.

Times are the process's CPU time on one thread and wall time on two (as in lstm_speed.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from models import lstm_kernels
from models.lstm import LSTM

B, H, T, D = 128, 128, 20, 10
STEPS_PER_RUN = 4     # the backward's ring at this size
CLIP_NORM = 10.0


def clock_for(threads: int):
    return time.process_time if threads == 1 else time.perf_counter


def per_call(fn, clock, calls: int) -> float:
    t0 = clock()
    for _ in range(calls):
        fn()
    return (clock() - t0) / calls


def op_alone(threads: int, rounds: int) -> dict[str, float]:
    """GFLOP/s of one run of steps' weight gradient, op against addmm (alternating rounds)."""
    gen = torch.Generator().manual_seed(0)
    n = STEPS_PER_RUN * B
    xh = torch.randn(n, D + H, generator=gen)
    dz = torch.randn(n, 4 * H, generator=gen)
    dW = torch.zeros(D + H, 4 * H)
    scratch = torch.empty(D + H, n)
    variants = {
        "lstm_weight_grad": lambda: torch.ops.palgan.lstm_weight_grad(xh, dz, dW, scratch, True),
        "addmm (MKL)": lambda: dW.addmm_(xh.t(), dz),
    }
    clock = clock_for(threads)
    times = {k: [] for k in variants}
    for fn in variants.values():
        per_call(fn, clock, 20)
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(per_call(fn, clock, 50))
    flops = 2.0 * n * (D + H) * 4 * H
    return {k: flops / statistics.median(v) / 1e9 for k, v in times.items()}


def training_steps(threads: int, rounds: int) -> dict[str, float]:
    """Median ms of the training step: script with the op, script with addmm, nn.LSTM."""
    torch.manual_seed(0)
    x = F.one_hot(torch.randint(0, D, (B, T)), D).float()
    y = torch.randint(0, 10, (B,))
    with_op = LSTM(D, H, 10, kernels="cpp")
    with_addmm = LSTM(D, H, 10, kernels="cpp", weight_grad_kernel=False)
    with_addmm.load_state_dict(with_op.state_dict())
    lstm = torch.nn.LSTM(D, H, batch_first=True)
    head = torch.nn.Linear(H, 10)
    ref_params = list(lstm.parameters()) + list(head.parameters())
    opt_ref = torch.optim.RMSprop(ref_params, lr=1e-3)

    def step_script(model: LSTM):
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)

        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            opt.step()
        return step

    def step_ref():
        loss = F.cross_entropy(head(lstm(x)[0][:, -1]), y)
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, CLIP_NORM)
        opt_ref.step()

    variants = {"script, weight-grad op": step_script(with_op), "script, addmm": step_script(with_addmm),
                "nn.LSTM": step_ref}
    clock = clock_for(threads)
    times = {k: [] for k in variants}
    for fn in variants.values():
        per_call(fn, clock, 5)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            times[k].append(per_call(variants[k], clock, 10))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    if any(t < 1 for t in args.threads) or args.rounds < 1:
        p.error("--threads and --rounds must be at least 1")
    if not lstm_kernels.available():
        print("error: the C++ step ops did not build here; nothing to compare (see models/lstm_kernels.py)",
              file=sys.stderr)
        raise SystemExit(2)
    for threads in args.threads:
        torch.set_num_threads(threads)
        clock = "CPU time" if threads == 1 else "wall clock"
        print(f"# {threads} thread(s), {clock}, {args.rounds} rounds, medians; torch {torch.__version__}")
        gflops = op_alone(threads, args.rounds)
        shape = f"({D + H} x {STEPS_PER_RUN * B}) @ ({STEPS_PER_RUN * B} x {4 * H})"
        for k, v in gflops.items():
            print(f"  weight gradient {shape}: {k:18s} {v:6.1f} GFLOP/s")
        ms = training_steps(threads, args.rounds)
        for k, v in ms.items():
            print(f"  training step (B, H, T) = ({B}, {H}, {T}): {k:24s} {v:6.2f} ms  "
                  f"({v / ms['nn.LSTM']:.3f}x nn.LSTM)")


if __name__ == "__main__":
    main()
