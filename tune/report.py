"""The report of a finished sweep, read back from its folder: each model's horizon (the largest T at
which some draw reached 99% on the fixed validation set, and the first T above it where every draw
failed) and the best accuracy per model and T.

    python tune/report.py runs/sweeps/lstm-sweep              # (re)write the report of a finished sweep
    python tune/report.py runs/sweeps/quick --no-wandb        # ... without the wandb summary run
    python tune/report.py runs/sweeps/gan-sweep               # a DCGAN sweep's (tune/gan_report.py)

Reads sweep.json (the sweep's flags), tune/ (Tune's record of every report) and each trial's
metrics.json (how its run ended); writes results.csv, table.md, figures/horizon.png, best.json (the
best trial per model and T with the trainers/lstm.py command that reruns it) and the wandb run
<name>-summary. tune/lstm_sweep.py writes it when a sweep ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from tyro.conf import Positional, arg

from trainers.cli import UsageError, flatten, from_saved, parse, run_cli
from trainers.figures import plt, save_figure
from trainers.files import write_json_atomic, write_text_atomic
from trainers.lstm import NUM_CLASSES, LSTMConfig
from tune.common import ended_sweep, markdown, read_metrics, results_csv, sweep_flags, trainer_argv
from tune.horizon import LABELS, cell_results, describe, horizon, model_of

SOLVED = 0.99   # validation accuracy that defines a model's horizon and each trial's steps_to_99
CHANCE = 1.0 / NUM_CLASSES
RESULT_COLUMNS = ("trial_id", "model", "round", "seq_length", "draw", "hidden_dim", "lr", "forget_bias", "status", "steps",
                  "best_val_acc", "best_step", "steps_to_99", "steps_to_solve", "val_acc", "val_loss", "train_acc",
                  "train_loss", "time_s", "run_dir")


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per trial, from Tune's record of it (its config and every report) and the trainer's
    metrics.json (how it ended); each row also holds the trial's LSTMConfig. ``round``: 0 for the
    grid, k for the model's k-th cell past it."""
    from ray.tune import ExperimentAnalysis

    analysis, rows = ExperimentAnalysis(str(Path(sweep_dir) / "tune")), []
    for trial in analysis.trials:
        config, history = trial.config, analysis.trial_dataframes.get(trial.trial_id)
        has_steps = history is not None and "step" in history
        reports = history.dropna(subset=["step"]).to_dict("records") if has_steps else []
        last = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in (reports or [{}])[-1].items()}
        run_dir = min((Path(sweep_dir) / "trials").glob(f"*-{trial.trial_id}"), default=None)   # named by trial id
        metrics = read_metrics(run_dir)
        scored = [(float(r["val/acc"]), int(r["step"])) for r in reports if not math.isnan(r.get("val/acc", math.nan))]
        best = max(scored, key=lambda a_s: (a_s[0], -a_s[1]), default=(None, None))   # earliest step of the best
        row = {"trial_id": trial.trial_id, "model": model_of(config), "round": config.get("round", 0), "seq_length": config["seq_length"],
               "draw": config.get("draw", 0), "hidden_dim": config["hidden_dim"], "lr": config["lr"],
               "forget_bias": config["forget_bias"] if config["model"] == "lstm" else None,
               "status": ("failed" if trial.status == "ERROR" else trial.status.lower() if trial.status != "TERMINATED"
                          else metrics.get("stop_reason", "stopped without a record")),
               "steps": last.get("step") and int(last["step"]), "best_val_acc": best[0], "best_step": best[1],
               "steps_to_99": min((s for a, s in scored if a >= SOLVED), default=None),
               "steps_to_solve": metrics.get("steps_to_solve") if metrics.get("stop_reason") == "solved" else None,
               "val_acc": last.get("val/acc"), "val_loss": last.get("val/loss"), "train_acc": last.get("train/acc"),
               "train_loss": last.get("train/loss"), "time_s": round(float(last.get("time_total_s") or 0.0), 1),
               "run_dir": str(run_dir) if run_dir else None,
               "config": from_saved(LSTMConfig, {**config, "run_name": run_dir.name if run_dir else ""})}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["model"], r["seq_length"], r["draw"], r["trial_id"]))


# --- what the tables and the figure show ----------------------------------------------------------

def grids(rows: list[dict]) -> dict[str, list[int]]:
    """model -> its grid of T (the T its trials ran), in the order of the tables' rows."""
    return {m: sorted({r["seq_length"] for r in rows if r["model"] == m}) for m in LABELS
            if any(r["model"] == m for r in rows)}


def all_lengths(rows: list[dict]) -> list[int]:
    return sorted({r["seq_length"] for r in rows})


def best_per_cell(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(model, T) -> its best trial: the highest best_val_acc, then the fewest steps to 99%, then the first."""
    best: dict[tuple[str, int], dict] = {}
    for r in sorted((r for r in rows if r["best_val_acc"] is not None), reverse=True,
                    key=lambda r: (r["best_val_acc"], -(r["steps_to_99"] or math.inf))):
        best.setdefault((r["model"], r["seq_length"]), r)
    return best


def horizons(rows: list[dict]) -> dict[str, dict]:
    """model -> its horizon: the largest T it ran at which some trial reached SOLVED, that trial,
    and the next T it ran beyond it (where every draw failed) with its draws and best accuracy
    (None: it ran nothing beyond); ``text``: "solved at T_s, failed at T_f with n draws"."""
    best, out = best_per_cell(rows), {}
    for model, grid in grids(rows).items():
        h = horizon(cell_results(rows, model, SOLVED))
        nxt = h["failed"]
        out[model] = {"horizon": h["solved"], "trial": best.get((model, h["solved"])), "next": nxt, "grid": grid,
                      "next_draws": h["draws"], "text": describe(h),
                      "next_acc": best[model, nxt]["best_val_acc"] if (model, nxt) in best else None}
    return out


def fewest_steps(rows: list[dict], model: str) -> dict[int, int]:
    """T -> the fewest steps any draw of (model, T) needed to reach SOLVED (absent: none did)."""
    out: dict[int, int] = {}
    for r in rows:
        if r["model"] == model and r["steps_to_99"]:
            out[r["seq_length"]] = min(out.get(r["seq_length"], r["steps_to_99"]), r["steps_to_99"])
    return dict(sorted(out.items()))


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def horizon_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each model's horizon with the config that got there, and what happened one T beyond."""
    columns = ["Model", f"Horizon (largest T with >= {100 * SOLVED:.0f}%)", "Best val acc there",
               f"Steps to {100 * SOLVED:.0f}%", "Config", "First failed T above: draws, best val acc", "In words"]
    body = []
    for model, h in horizons(rows).items():
        r = h["trial"]
        fb = "" if r is None or r["forget_bias"] is None else f", forget bias {r['forget_bias']:g}"
        body.append([LABELS[model], "none" if r is None else f"T={h['horizon']}", pct(r and r["best_val_acc"]),
                     "n/a" if r is None else str(r["steps_to_99"]),
                     "n/a" if r is None else f"hidden {r['hidden_dim']}, lr {r['lr']:.2g}{fb}, seed draw {r['draw']}",
                     f"T={h['next']}: {h['next_draws']} draws, best {pct(h['next_acc'])}" if h["next"] is not None
                     else f"none: the sweep ends at T={max(h['grid'])}", h["text"]])
    return columns, body


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Best validation accuracy per model and T (over the grid point's draws), the draws that
    reached SOLVED, and the LSTM's lead over the RNN in percentage points where both ran."""
    best, lengths, grid = best_per_cell(rows), all_lengths(rows), grids(rows)
    acc = {m: [best[m, t]["best_val_acc"] if (m, t) in best else None for t in lengths] for m in grid}
    out = [[LABELS[m]] + [pct(v) if t in grid[m] else "-" for t, v in zip(lengths, acc[m])] for m in grid]
    for m in grid:
        draws = [[r for r in rows if r["model"] == m and r["seq_length"] == t] for t in lengths]
        out.append([f"{LABELS[m]}: draws >= {100 * SOLVED:.0f}%"] +
                   [f"{sum((r['best_val_acc'] or 0) >= SOLVED for r in d)}/{len(d)}" if d else "-" for d in draws])
    if "lstm" in grid and "rnn" in grid:
        out.append(["LSTM - RNN"] + ["-" if a is None or b is None else f"{100 * (a - b):+.2f} pp"
                                     for a, b in zip(acc["lstm"], acc["rnn"])])
    return ["Model"] + [f"T={t}" for t in lengths], out


def status_counts(rows: list[dict]) -> dict[str, int]:
    return {k: sum(r["status"].startswith(k) for r in rows) for k in ("solved", "culled", "completed", "failed")}


def table_markdown(rows: list[dict], f: dict, wall_s: float | None = None) -> str:
    """The horizons, then the best accuracy per (model, T), then the fewest steps to SOLVED."""
    counts, listed, lengths = status_counts(rows), lambda xs: ", ".join(f"{x:g}" for x in xs), all_lengths(rows)
    lines = [f"Horizons: sweep `{f['name']}`, {f['input_encoding']} input" +
             ("" if wall_s is None else f", {wall_s / 60:.1f} min wall clock including Ray's start") + ".", "",
             *markdown(*horizon_rows(rows)), "",
             f"Best validation accuracy per model and T over the grid point's draws ({len(rows)} trials: "
             f"{counts['solved']} solved, {counts['culled']} culled, {counts['completed']} ran all steps, "
             f"{counts['failed']} failed). Each grid point: {f['num_samples']} draws of hidden_dim in "
             f"{{{listed(f['hidden_dims'])}}} and lr log-uniform in [{f['lr_min']:g}, {f['lr_max']:g}], each with its "
             "own seed" + (f", the LSTM's forget-gate bias in turn from {{{listed(f['forget_biases'])}}}"
                           if "lstm" in grids(rows) else "") +
             f"; up to {f['steps']} steps of batch {f['batch_size']}, solved at {100 * f['solved_acc']:g}% held for "
             f"{f['solve_patience']} validations (every {f['eval_every']} steps), culled by ASHA per grid point or "
             f"below {100 * f['floor_acc']:g}% from step {f['floor_step']}" +
             (f" (x T/{f['floor_length']} above T={f['floor_length']}, at most from step {f['steps'] // 2})"
              if f.get("floor_length") else "") +
             f"; fixed validation set of {f['val_size']} "
             f"palindromes per T. Chance is {100 * CHANCE:.0f}%. -: not run for that model." +
             (f" Past the grid, each model's T was extended (doubling, then bisecting between the last solved and "
              f"the first failed T, to within x{f['horizon_resolution']:g}) with {f['horizon_draws']} seeds of the best "
              "configuration at its longest solved T, and the first failed T given at least as many draws."
              if f.get("horizon_draws") else ""), "",
             *markdown(*table_rows(rows)), "",
             f"Fewest steps any draw needed to reach {100 * SOLVED:.0f}% validation accuracy (checked every "
             f"{f['eval_every']} steps; never: no draw got there):", ""]
    body = [[LABELS[m]] + [str(fewest_steps(rows, m).get(t, "never")) if t in grid else "-" for t in lengths]
            for m, grid in grids(rows).items()]
    return "\n".join(lines + markdown(["Model"] + [f"T={t}" for t in lengths], body)) + "\n"


def plot_horizon(rows: list[dict], f: dict, path: Path) -> Path:
    """Left: the best validation accuracy against T per model (every draw faint, chance marked,
    each horizon dotted). Right: the fewest steps any draw needed to reach SOLVED."""
    best, found, lengths = best_per_cell(rows), horizons(rows), all_lengths(rows)
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"lstm": "o-", "rnn": "s--", "rnn-orthogonal": "v--", "rnn-identity": "^--"}
    for model in found:
        label, h, style = LABELS[model], found[model]["horizon"], styles[model]
        ts = [t for t in found[model]["grid"] if (model, t) in best]
        color = ax.plot(ts, [best[model, t]["best_val_acc"] for t in ts], style, lw=2,
                        label=f"{label}: best draw ({found[model]['text']})")[0].get_color()
        drawn = [r for r in rows if r["model"] == model and r["best_val_acc"] is not None]
        ax.scatter([r["seq_length"] for r in drawn], [r["best_val_acc"] for r in drawn], s=14, alpha=0.35,
                   color=color, label=f"{label}: each draw")
        if h is not None:
            ax.axvline(h, color=color, ls=":", lw=1)
        fastest = fewest_steps(rows, model)
        ax_steps.plot(list(fastest), list(fastest.values()), style, color=color, lw=2, label=label)
    ax.axhline(CHANCE, color="grey", ls="-.", lw=1, label=f"chance ({100 * CHANCE:.0f}%)")
    ax.axhline(SOLVED, color="grey", ls=":", lw=1)
    for a in (ax, ax_steps):
        a.set_xscale("log" if max(lengths) / min(lengths) > 8 else "linear")
        a.set_xticks(lengths, [str(t) for t in lengths], fontsize=7, rotation=60)
        a.minorticks_off()
        a.grid(alpha=0.3)
    ax.set(xlabel="palindrome length T", ylabel="best validation accuracy", ylim=(0, 1.03),
           title=f"best accuracy against T ({len(rows)} trials)")
    ax_steps.set(xlabel="palindrome length T", ylabel=f"steps to {100 * SOLVED:.0f}% validation accuracy",
                 xlim=ax.get_xlim(), ylim=(0, f["steps"] * 1.03),
                 title=f"fewest steps to {100 * SOLVED:.0f}% (missing: never reached)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax_steps.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle(f"sweep {f['name']} ({f['input_encoding']} input, <= {f['steps']} steps per trial)")
    return save_figure(fig, path)


def best_json(rows: list[dict], f: dict) -> dict:
    """Each model's horizon (the trial that reached it, with the trainer command that reruns it)
    and the best trial of every (model, T)."""
    def entry(r: dict) -> dict:
        argv = trainer_argv(r["config"], LSTMConfig())
        return {**{k: r[k] for k in ("best_val_acc", "best_step", "steps_to_99", "trial_id", "status", "run_dir",
                                     "hidden_dim", "lr", "forget_bias", "draw")},
                "argv": argv, "command": " ".join(["python trainers/lstm.py", *argv]), "config": flatten(r["config"])}

    cells: dict[str, dict] = {}
    for (model, t), r in sorted(best_per_cell(rows).items()):
        cells.setdefault(model, {})[str(t)] = entry(r)
    return {"solved_at": SOLVED, "input_encoding": f["input_encoding"], "cells": cells,
            "horizons": {m: None if h["trial"] is None else {"seq_length": h["horizon"], **entry(h["trial"])}
                         for m, h in horizons(rows).items()}}


def log_summary_run(rows: list[dict], f: dict, sweep_dir: Path, figure: Path, wall_s: float | None,
                    use_wandb: bool) -> None:
    """One wandb run in the sweep's group: the horizons and the accuracy per T as tables, each
    model's best accuracy and steps to SOLVED against T as native line plots, every trial's row,
    the figure, and the horizons in the run summary."""
    from trainers.runtime import make_accelerator
    from trainers.tracking import start_tracker

    tracker = start_tracker(make_accelerator("no", use_wandb, sweep_dir), f["wandb_project"], f"{f['name']}-summary",
                            f, sweep_dir, group=f["name"], job_type="sweep-summary", tags=(f["input_encoding"],))
    tracker.log_table("sweep/horizons", *horizon_rows(rows), step=0)
    tracker.log_table("sweep/table", *table_rows(rows), step=0)
    tracker.log_table("sweep/trials", RESULT_COLUMNS, [[r[c] for c in RESULT_COLUMNS] for r in rows], step=0)
    best = best_per_cell(rows)
    for model, grid in grids(rows).items():
        label, ts, fastest = LABELS[model], [t for t in grid if (model, t) in best], fewest_steps(rows, model)
        if ts:
            tracker.log_lines(f"sweep/{model}/best_val_acc_vs_T", ts,
                              {f"{label}: best val acc": [best[model, t]["best_val_acc"] for t in ts],
                               "chance": [CHANCE] * len(ts)}, step=0,
                              title=f"{label}: best validation accuracy against T", xname="T")
        if fastest:
            tracker.log_lines(f"sweep/{model}/steps_to_99_vs_T", list(fastest),
                              {f"{label}: fewest steps to {100 * SOLVED:.0f}%": list(fastest.values())}, step=0,
                              title=f"{label}: steps to {100 * SOLVED:.0f}% against T", xname="T")
    tracker.log_images({"sweep/horizon": figure}, step=0)
    summary = {f"horizon/{m}": h["horizon"] for m, h in horizons(rows).items() if h["horizon"] is not None}
    summary.update({f"trials/{k}": v for k, v in status_counts(rows).items()},
                   **({} if wall_s is None else {"wall_time_s": round(wall_s, 1)}))
    tracker.summary(summary)
    tracker.finish()


def write_report(sweep_dir: Path, rows: list[dict] | None = None, wall_s: float | None = None,
                 use_wandb: bool | None = None) -> dict[str, Path]:
    """Write the report of the finished sweep in ``sweep_dir`` (its rows read from it unless given)."""
    sweep_dir, f, rows = ended_sweep(sweep_dir, rows, collect_rows, "tune/lstm_sweep.py")
    paths = {"results": write_text_atomic(sweep_dir / "results.csv", results_csv(rows, RESULT_COLUMNS)),
             "table": write_text_atomic(sweep_dir / "table.md", table_markdown(rows, f, wall_s)),
             "figure": plot_horizon(rows, f, sweep_dir / "figures" / "horizon.png"),
             "best": write_json_atomic(sweep_dir / "best.json", best_json(rows, f))}
    log_summary_run(rows, f, sweep_dir, paths["figure"], wall_s, f["wandb"] if use_wandb is None else use_wandb)
    return paths


@dataclass
class ReportConfig:
    """Write the report of a finished sweep."""
    sweep_dir: Annotated[Positional[str], arg(metavar="SWEEP_DIR")] = ""  # the sweep's folder, <out-dir>/sweeps/<name>
    wandb: bool = True  # also log the summary run to wandb (when the sweep did); --no-wandb for none

    def validate(self) -> None:
        if not self.sweep_dir:
            raise UsageError("give the sweep's folder: python tune/report.py <out-dir>/sweeps/<name>")


def main(argv=None) -> dict[str, Path]:
    rc = parse(ReportConfig, argv, prog="tune/report.py", description=__doc__.splitlines()[0])
    from tune import gan_report

    writer = gan_report.write_report if "scheduler" in sweep_flags(rc.sweep_dir)[1] else write_report   # which sweep
    paths = writer(Path(rc.sweep_dir), use_wandb=None if rc.wandb else False)
    print(paths["table"].read_text())
    return paths


if __name__ == "__main__":
    run_cli(main)
