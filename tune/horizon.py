"""Where a model's memory ends: the extension of the sweep past its fixed grid, as a pure rule.

A sweep "model" is an architecture and, for the RNN, the initialisation of its W_hh:
``lstm``, ``rnn`` (the default init), ``rnn-orthogonal`` and ``rnn-identity``.

After the fixed grid, each model's T is extended upward from what it has shown so far, one cell
(T and a number of draws) at a time, until its horizon is pinned down:
1. nothing solved: no extension (the horizon lies below the grid);
2. no failed T above the longest solved one: double it (capped at ``max_length``);
3. the first failed T above it has fewer than ``draws`` draws: give it the missing ones (a
   failure with one or two draws is not evidence enough);
4. otherwise bisect between the last solved T_s and the first failed T_f, until T_f is within
   ``resolution`` x T_s (or the next integer).
The horizon is then "solved at T_s, failed at T_f with n draws".
"""
from __future__ import annotations

MODELS = ("lstm", "rnn", "rnn-orthogonal", "rnn-identity")
LABELS = {"rnn": "Vanilla RNN", "rnn-orthogonal": "Vanilla RNN, orthogonal W_hh",
          "rnn-identity": "Vanilla RNN, identity W_hh", "lstm": "LSTM"}   # also the order of the tables' rows


def arch(model: str) -> str:
    """The trainer's --model of a sweep model: lstm or rnn."""
    return model.split("-")[0]


def rnn_init(model: str) -> str:
    """The trainer's --rnn-init of a sweep model (the LSTM's is the unused default)."""
    return model.split("-", 1)[1] if "-" in model else "default"


def model_of(config: dict) -> str:
    """The sweep model of a trainer config (flat): ``rnn-identity`` for --model rnn --rnn-init identity."""
    init = config.get("rnn_init", "default")
    return config["model"] if config["model"] != "rnn" or init == "default" else f"rnn-{init}"


Results = dict[int, tuple[int, int]]   # T -> (draws that solved it, draws run)


def solved_and_failed(results: Results) -> tuple[int | None, int | None]:
    """The longest solved T and the shortest T above it (every draw there failed), either None."""
    solved = max((t for t, (s, _) in results.items() if s > 0), default=None)
    failed = min((t for t in results if solved is None or t > solved), default=None)
    return solved, failed


def next_cell(results: Results, draws: int, resolution: float, max_length: int) -> tuple[int, int] | None:
    """The next (T, draws to add) of one model's horizon search, from its results so far; None once
    the horizon is found (or the extension has nowhere to go)."""
    t_s, t_f = solved_and_failed(results)
    if t_s is None:
        return None
    if t_f is None:
        return (min(2 * t_s, max_length), draws) if t_s < max_length else None
    missing = draws - results[t_f][1]
    if missing > 0:
        return t_f, missing
    mid = (t_s + t_f) // 2
    if t_f <= t_s * resolution or mid == t_s:
        return None
    return mid, draws


def horizon(results: Results) -> dict:
    """``{"solved": T_s, "failed": T_f, "draws": n}``: the longest solved T, the first failed T above
    it and the draws that failed there (None where there is none)."""
    t_s, t_f = solved_and_failed(results)
    return {"solved": t_s, "failed": t_f, "draws": None if t_f is None else results[t_f][1]}


def describe(h: dict) -> str:
    """"solved at T=600, failed at T=700 with 4 draws" and its partial forms."""
    solved = "solved nowhere" if h["solved"] is None else f"solved at T={h['solved']}"
    if h["failed"] is None:
        return solved + ", failed nowhere it was tried"
    return f"{solved}, failed at T={h['failed']} with {h['draws']} draw{'s' * (h['draws'] != 1)}"


def cell_results(rows: list[dict], model: str, solved_acc: float) -> Results:
    """T -> (draws that reached ``solved_acc``, draws run) of one sweep model, from the report's rows."""
    out: Results = {}
    for r in rows:
        if r["model"] == model:
            solved, n = out.get(r["seq_length"], (0, 0))
            out[r["seq_length"]] = (solved + ((r["best_val_acc"] or 0) >= solved_acc), n + 1)
    return dict(sorted(out.items()))
