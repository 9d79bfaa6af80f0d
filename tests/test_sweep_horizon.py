"""The sweep's extension past its grid: the rule (tune/horizon.py) as a pure function of the results
so far, the points it turns into, the search that runs it per model (tune/horizon_search.py), and
one tiny sweep whose extension runs under Ray."""
import csv
import json
from pathlib import Path

import pytest

from trainers.cli import build
from tune.horizon import cell_results, describe, horizon, model_of, next_cell
from tune.lstm_sweep import SweepConfig, extension_points, run_sweep
from tune.report import best_per_cell


def search(truth: int, results: dict, draws: int = 4, resolution: float = 1.25, max_length: int = 4000):
    """Run the rule against a model that solves exactly the T <= ``truth`` (every draw), from the
    grid ``results``; return the cells it asked for, in order, and the results at the end."""
    results, asked = dict(results), []
    while (cell := next_cell(results, draws, resolution, max_length)) is not None:
        t, add = cell
        asked.append(cell)
        solved, ran = results.get(t, (0, 0))
        results[t] = (solved + add * (t <= truth), ran + add)
        assert len(asked) < 50
    return asked, results


def test_a_failed_grid_edge_gets_its_draws_then_the_gap_is_bisected():
    grid = {20: (3, 3), 50: (1, 3), 100: (0, 3)}
    asked, results = search(80, grid)
    # 100 failed with 3 draws: one more; still failed, so bisect 50..100 -> 75 (solved), 75..100 -> 87
    # (failed); 87 <= 1.25 * 75: found
    assert asked == [(100, 1), (75, 4), (87, 4)]
    assert horizon(results) == {"solved": 75, "failed": 87, "draws": 4}
    assert describe(horizon(results)) == "solved at T=75, failed at T=87 with 4 draws"


def test_a_fully_solved_grid_doubles_until_a_failure_then_bisects():
    asked, results = search(700, {10: (1, 1), 200: (2, 3), 400: (1, 3)})
    assert asked == [(800, 4), (600, 4), (700, 4)]
    assert horizon(results) == {"solved": 700, "failed": 800, "draws": 4}


@pytest.mark.parametrize("truth", [3, 17, 99, 250, 999, 1500])
def test_the_rule_always_brackets_the_true_horizon_within_the_resolution(truth):
    asked, results = search(truth, {2: (2, 2), 4: (2 * (truth >= 4), 2)}, draws=3, resolution=1.25)
    h = horizon(results)
    assert h["solved"] <= truth < h["failed"]
    assert h["failed"] <= 1.25 * h["solved"] or h["failed"] - h["solved"] == 1
    assert h["draws"] >= 3                                          # every failure it reports has its draws
    assert all(results[t][1] >= 3 for t, _ in asked)                # so does every T it asked for


def test_the_rule_stops_where_it_must():
    assert next_cell({10: (0, 3), 20: (0, 3)}, 4, 1.25, 4000) is None        # nothing solved: below the grid
    assert next_cell({10: (1, 3)}, 4, 1.25, 15) == (15, 4)                    # doubling is capped ...
    assert next_cell({10: (1, 3), 15: (2, 4)}, 4, 1.25, 15) is None           # ... and ends there
    assert next_cell({10: (1, 3), 11: (0, 4)}, 4, 1.25, 4000) is None         # no integer in between
    # a solved T above a failed one: the longest solved counts, the failure below it does not
    assert next_cell({10: (1, 3), 20: (0, 3), 30: (1, 3)}, 4, 1.25, 4000) == (60, 4)


def rows_of(cells: dict) -> list[dict]:
    """Report rows: (model, T) -> [(best_val_acc, hidden_dim, lr, forget_bias), ...] per draw."""
    return [{"model": m, "seq_length": t, "draw": k, "best_val_acc": acc, "hidden_dim": h, "lr": lr,
             "forget_bias": fb, "steps_to_99": 500 if acc >= 0.99 else None, "trial_id": f"{m}{t}{k}", "round": 0}
            for (m, t), draws in cells.items() for k, (acc, h, lr, fb) in enumerate(draws)]


def test_extension_points_are_new_seeds_of_the_best_configuration_at_the_last_solved_t():
    sc = build(SweepConfig, models=("lstm", "rnn-identity"), num_samples=2, horizon_draws=3, seed=10)
    rows = rows_of({("lstm", 50): [(0.5, 32, 1e-3, 3.0), (1.0, 64, 1.5e-3, 5.0)],
                    ("lstm", 100): [(0.1, 32, 1e-3, 3.0), (0.2, 64, 8e-4, 5.0)],
                    ("rnn-identity", 20): [(0.995, 32, 9e-4, None), (0.999, 64, 1.2e-3, None)]})
    assert cell_results(rows, "lstm", 0.99) == {50: (1, 2), 100: (0, 2)}
    points = extension_points(sc, rows)
    lstm = [p for p in points if p["sweep_model"] == "lstm"]
    rnn = [p for p in points if p["sweep_model"] == "rnn-identity"]
    # the LSTM: T=100 failed with 2 draws, so one more, draw 2 with seed 12, as the best draw at T=50
    assert lstm == [{"sweep_model": "lstm", "model": "lstm", "rnn_init": "default", "seq_length": 100, "draw": 2,
                     "seed": 12, "forget_bias": 5.0, "hidden_dim": 64, "lr": 1.5e-3, "round": 1}]
    # the identity RNN solved its whole grid: double it, three draws of its best configuration
    assert [(p["seq_length"], p["draw"], p["seed"], p["hidden_dim"], p["lr"], p["model"], p["rnn_init"])
            for p in rnn] == [(40, k, 10 + k, 64, 1.2e-3, "rnn", "identity") for k in range(3)]
    assert extension_points(build(SweepConfig, models=("lstm",), horizon_draws=0), rows) == []
    assert model_of({"model": "rnn", "rnn_init": "orthogonal"}) == "rnn-orthogonal"
    assert model_of({"model": "lstm", "rnn_init": "identity"}) == "lstm"


class FakeTune:
    """Tune's side of a search: trials started on ``slots`` CPUs, each ended with the accuracy its
    model reaches at its T (``truth``: the longest T each model solves)."""

    def __init__(self, search, truth: dict):
        self.search, self.truth, self.running, self.started, self.n = search, truth, {}, [], 0

    def fill(self, slots: int = 2):
        while len(self.running) < slots:
            self.n += 1
            p = self.search.suggest(f"t{self.n}")
            if not isinstance(p, dict):
                return p
            self.running[f"t{self.n}"] = p
            self.started.append((p["sweep_model"], p["seq_length"]))

    def end(self, trial_id):
        p = self.running.pop(trial_id)
        acc = 1.0 if p["seq_length"] <= self.truth[p["sweep_model"]] else 0.1
        self.search.on_trial_result(trial_id, {"val/acc": acc, "step": 100})
        self.search.on_trial_complete(trial_id, {"val/acc": acc, "step": 200})


def test_each_model_extends_as_soon_as_its_own_trials_end_while_the_other_still_runs(tmp_path):
    from ray.tune.search import Searcher

    from tune.horizon_search import HorizonSearch
    from tune.lstm_sweep import extend, grid_points

    sc = build(SweepConfig, models=("lstm", "rnn"), lstm_seq_lengths=(10,), rnn_seq_lengths=(10,), num_samples=1,
               horizon_draws=1, horizon_resolution=2.0, max_seq_length=80, out_dir=str(tmp_path), wandb=False)
    grid = grid_points(sc)
    search = HorizonSearch(grid, ["lstm", "rnn"], lambda rows, m: extend(sc, rows, m))
    tune = FakeTune(search, {"lstm": 80, "rnn": 15})
    tune.fill()
    assert [m for m, _ in tune.started] == ["lstm", "rnn"] and search.suggest("x") is None   # both busy
    rnn_trial = next(t for t, p in tune.running.items() if p["sweep_model"] == "rnn")
    lstm_trial = next(t for t, p in tune.running.items() if p["sweep_model"] == "lstm")
    tune.end(lstm_trial)                   # the LSTM's grid ended while the RNN's trial still runs:
    tune.fill()                            # its first cell past the grid starts at once
    assert tune.started[-1] == ("lstm", 20) and rnn_trial in tune.running
    # save and restore (Tune's experiment state, --resume): the same search continues
    search.save(str(tmp_path / "search.pkl"))
    again = HorizonSearch(grid, ["lstm", "rnn"], lambda rows, m: extend(sc, rows, m))
    again.restore(str(tmp_path / "search.pkl"))
    assert (again.queue, again.live, again.rows, again.found) == (search.queue, search.live, search.rows, search.found)
    while True:   # run it out, always ending the oldest trial
        if tune.fill() == Searcher.FINISHED:
            break
        tune.end(next(iter(tune.running)))
    cells = {m: sorted({t for mm, t in tune.started if mm == m}) for m in ("lstm", "rnn")}
    assert cells == {"lstm": [10, 20, 40, 80], "rnn": [10, 20]}   # LSTM: doubled up to the cap; RNN: failed at 20
    assert search.found == {"lstm", "rnn"} and not tune.running


def test_a_cell_past_the_grid_stops_drawing_once_a_draw_solves_it_and_a_failed_one_gets_every_draw(tmp_path):
    from ray.tune.search import Searcher

    from tune.horizon_search import HorizonSearch
    from tune.lstm_sweep import extend, grid_points

    sc = build(SweepConfig, models=("lstm",), lstm_seq_lengths=(10,), num_samples=2, horizon_draws=3,
               horizon_resolution=2.0, max_seq_length=40, out_dir=str(tmp_path), wandb=False)
    search = HorizonSearch(grid_points(sc), ["lstm"], lambda rows, m: extend(sc, rows, m))
    tune = FakeTune(search, {"lstm": 20})
    while tune.fill(slots=1) != Searcher.FINISHED:   # one trial at a time
        tune.end(next(iter(tune.running)))
    # the grid's two draws run; T=20 is solved by its first draw (the other two are not started);
    # T=40 fails with all three; 40 <= 2 x 20 ends it
    assert tune.started == [("lstm", 10)] * 2 + [("lstm", 20)] + [("lstm", 40)] * 3


def test_a_tiny_sweep_extends_its_grid_until_the_horizon_is_found(ray_session, tmp_path):
    # T=2 is learnt in a few dozen steps at lr 1e-2; the extension doubles to 4 (the cap) with two new
    # seeds of the best configuration, and with a resolution of x2 that one round settles it
    sc = build(SweepConfig, models=("lstm",), seq_lengths=(2,), hidden_dims=(8,), num_samples=1, steps=60,
               eval_every=20, grace_period=20, batch_size=32, val_size=200, lr_min=9e-3, lr_max=1.1e-2,
               floor_acc=0, horizon_draws=2, horizon_resolution=2.0, max_seq_length=4, wandb=False, out_dir=str(tmp_path), name="ext")
    outcome = run_sweep(sc, verbose=0)
    sweep, rows = outcome["sweep_dir"], outcome["rows"]
    assert outcome["unfinished"] == 0 and outcome["errors"] == 0
    grid = [r for r in rows if r["round"] == 0]
    assert [(r["seq_length"], r["best_val_acc"] >= 0.99) for r in grid] == [(2, True)]
    # replay the rule on what each round found: the rounds are exactly the cells it asks for
    done = {}
    for k in range(1 + max(r["round"] for r in rows)):
        this = [r for r in rows if r["round"] == k]
        if k:
            before = [r for r in rows if r["round"] < k]
            results = cell_results(before, "lstm", 0.99)
            t, add = next_cell(results, 2, 2.0, 4)
            ran = results.get(t, (0, 0))[1]
            assert sorted((r["seq_length"], r["draw"]) for r in this) == [(t, d) for d in range(ran, ran + add)]
            best = best_per_cell(before)["lstm", horizon(results)["solved"]]
            assert {(r["hidden_dim"], r["lr"], r["config"].run.seed) for r in this} == \
                {(best["hidden_dim"], best["lr"], d) for d in range(ran, ran + add)}
        done = cell_results([r for r in rows if r["round"] <= k], "lstm", 0.99)
    assert next_cell(done, 2, 2.0, 4) is None and max(r["round"] for r in rows) == 1
    # the report reads every round: the table's words and results.csv
    table = (sweep / "table.md").read_text()
    assert describe(horizon(done)) in table
    csv_rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert sorted((int(r["round"]), int(r["seq_length"])) for r in csv_rows) == \
        sorted((r["round"], r["seq_length"]) for r in rows)
    best = json.loads((sweep / "best.json").read_text())
    assert best["horizons"]["lstm"]["seq_length"] == horizon(done)["solved"]
    for r in rows:   # each trial's run folder: the trainer's record of its T and seed
        cfg = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["config"]
        assert (cfg["seq_length"], cfg["seed"]) == (r["seq_length"], r["draw"])


def test_the_floor_starts_later_for_longer_palindromes():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from tune.asha import GroupedASHA

    sched = GroupedASHA(("model", "seq_length"), metric="val/acc", mode="max", time_attr="step", max_t=5000,
                        grace_period=5000, reduction_factor=3, floor_acc=0.15, floor_step=750, floor_length=100)
    verdicts = {}
    for t in (50, 100, 200, 400):
        trial = SimpleNamespace(trial_id=f"t{t}", config={"model": "lstm", "seq_length": t})
        sched.on_trial_add(None, trial)
        for step in range(250, 3251, 250):   # at chance throughout
            if sched.on_trial_result(None, trial, {"step": step, "val/acc": 0.1}) == TrialScheduler.STOP:
                verdicts[t] = step
                break
    # up to T=100 from step 750; at T=200 from 750 x 200 / 100 = 1500; at T=400 from half of max_t
    assert verdicts == {50: 750, 100: 750, 200: 1500, 400: 2500}
