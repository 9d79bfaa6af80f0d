"""The report of a finished DCGAN sweep (tune/gan_sweep.py), read back from its folder.

    python tune/report.py runs/sweeps/gan-sweep               # (re)write the report of a finished sweep

Reads sweep.json (the flags), tune/ (Tune's record of every stage report and checkpoint) and each
trial's metrics.json and attempts.jsonl; writes results.csv, table.md (the trials by their best FID
over the floor), figures/fid_vs_time.png (FID/floor against the trainer's wall time for every trial,
PBT's exploitations marked), best.json and the wandb run <name>-summary.

best.json: under ASHA the best configuration and the trainers/gan.py command that retrains it from
scratch (to the epoch of its best stage); under PBT the best trial's best checkpoint and the
schedule of learning rates that made it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from trainers.cli import flatten, override
from trainers.figures import plt, save_figure
from trainers.files import write_json_atomic, write_text_atomic
from tune.common import ended_sweep, markdown, read_metrics, results_csv, trainer_argv

METRIC = "fid_ratio"          # stage FID / the floor's FID at as many real images; lower is better
TIME_ATTR = "wall_s"          # the trainer's wall time at a report
ATTEMPTS = "attempts.jsonl"   # one line per start of a trial's trainer
COLUMNS = ("trial_id", "status", "lr", "lr_d", "beta1", "ema_decay", "batch_size", "base_channels", "stages",
           "best_fid_ratio", "best_fid", "best_epoch", "best_wall_s", "best_classifier_score", "best_min_class_frac",
           "best_max_class_frac", "last_fid_ratio", "wall_s", "exploited", "run_dir")
HYPER = ("lr", "lr_d", "beta1", "ema_decay", "batch_size", "base_channels")   # GANConfig fields a trial draws
PRESET = "cpu-demo"           # every trial starts from this preset's config


def read_attempts(run_dir: Path | None) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / ATTEMPTS).read_text().splitlines() if line.strip()]
    except (OSError, TypeError, ValueError):
        return []


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per trial: its config (the last one, under PBT), every stage it reported, its best
    stage, how its run ended (metrics.json) and its starts (attempts.jsonl)."""
    from ray.tune import ExperimentAnalysis

    sweep_dir = Path(sweep_dir)
    analysis, rows = ExperimentAnalysis(str(sweep_dir / "tune")), []
    for trial in analysis.trials:
        config, history = trial.config, analysis.trial_dataframes.get(trial.trial_id)
        reports = history.dropna(subset=[METRIC]).to_dict("records") if history is not None and METRIC in history \
            else []
        run_dir = min((sweep_dir / "trials").glob(f"*-{trial.trial_id}"), default=None)
        metrics, best = read_metrics(run_dir), min(reports, key=lambda r: (r[METRIC], r[TIME_ATTR]), default={})
        attempts = read_attempts(run_dir)
        checkpoint = analysis.get_best_checkpoint(trial, metric=METRIC, mode="min") if reports else None
        rows.append({
            "trial_id": trial.trial_id, **{k: config[k] for k in HYPER},
            "status": ("failed" if trial.status == "ERROR" else trial.status.lower() if trial.status != "TERMINATED"
                       else metrics.get("stop_reason", "stopped without a record")),
            "stages": len(reports), "best_fid_ratio": best.get(METRIC), "best_fid": best.get("fid"),
            "best_epoch": best.get("epoch") and int(best["epoch"]), "best_wall_s": best.get(TIME_ATTR),
            "best_classifier_score": best.get("classifier_score"), "best_min_class_frac": best.get("min_class_frac"),
            "best_max_class_frac": best.get("max_class_frac"),
            "last_fid_ratio": reports[-1][METRIC] if reports else None,
            "wall_s": reports[-1][TIME_ATTR] if reports else None,
            "exploited": sum(a["source"] not in (None, a["run"]) for a in attempts),
            "run_dir": str(run_dir) if run_dir else None, "reports": reports, "attempts": attempts,
            "config": config, "best_checkpoint": checkpoint.path if checkpoint else None})
    return sorted(rows, key=lambda r: (r["best_fid_ratio"] is None, r["best_fid_ratio"] or 0, r["trial_id"]))


def preset_point() -> dict:
    """cpu-demo's values of the sampled fields (its D learning rate is its --lr)."""
    from trainers.gan import make_config

    cfg = make_config(PRESET)
    return {**{k: flatten(cfg)[k] for k in HYPER}, "lr_d": cfg.optim.lr}


def is_preset(row: dict) -> bool:
    preset = preset_point()
    return all(math.isclose(row[k], preset[k]) for k in HYPER) and not row["exploited"]


def num(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def table_body(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = ["Trial", "lr G", "lr D", "beta1", "EMA", "batch", "width", "stages", "best FID/floor (FID)",
               "at epoch, wall", "score", "classes", "how it ended"]
    body = [[r["trial_id"] + (" (cpu-demo)" if is_preset(r) else ""), f"{r['lr']:.2e}", f"{r['lr_d']:.2e}",
             f"{r['beta1']:g}", f"{r['ema_decay']:g}", str(r["batch_size"]), str(r["base_channels"]), str(r["stages"]),
             f"{num(r['best_fid_ratio'])} ({num(r['best_fid'])})",
             "n/a" if r["best_epoch"] is None else f"{r['best_epoch']}, {r['best_wall_s']:.0f} s",
             num(r["best_classifier_score"]),
             "n/a" if r["best_min_class_frac"] is None else
             f"{100 * r['best_min_class_frac']:.1f}-{100 * r['best_max_class_frac']:.1f}%",
             r["status"] + (f", exploited {r['exploited']}x" if r["exploited"] else "")] for r in rows]
    return columns, body


def table_markdown(rows: list[dict], f: dict, wall_s: float | None = None) -> str:
    counts = {k: sum(r["status"].startswith(k) for r in rows) for k in ("time budget", "culled", "completed", "failed")}
    how = ("ASHA over fixed configurations, rungs from "
           f"{f['grace_period_s']:g} s times {f['reduction_factor']:g}" if f["scheduler"] == "asha" else
           f"PBT of the learning rates every {f['perturbation_interval_s']:g} s")
    lines = [f"DCGAN sweep `{f['name']}`: {len(rows)} trials, {how}, {f['time_budget_s']:g} s of trainer wall time "
             f"each" + ("" if wall_s is None else f"; {wall_s / 60:.1f} min wall clock including Ray's start") + ".",
             "",
             f"FID/floor: the FID of {f['stage_samples']} samples of the EMA generator against the MNIST test set, "
             f"over the FID of as many real training images, after every epoch on "
             f"{f['train_subset'] or 60000} training images; lower is better. Ended: {counts['time budget']} at the "
             f"budget, {counts['culled']} culled, {counts['completed']} ran all {f['epochs']} epochs, "
             f"{counts['failed']} failed. Classes: the rarest and the commonest digit's share of the samples.", "",
             *markdown(*table_body(rows))]
    return "\n".join(lines) + "\n"


def source_point(rows_by_run: dict, attempt: dict) -> tuple[float, float] | None:
    """(wall, FID/floor) of the report whose checkpoint an exploiting trial copied."""
    src = rows_by_run.get(attempt["source"])
    found = [r for r in (src or {}).get("reports", []) if math.isclose(r[TIME_ATTR], attempt["wall_s"], abs_tol=1e-3)]
    return (found[0][TIME_ATTR], found[0][METRIC]) if found else None


def plot_fid_vs_time(rows: list[dict], f: dict, path: Path) -> Path:
    """FID/floor against the trainer's wall time, one line per trial; culled trials end in x, PBT's
    exploitations are a dashed jump from the copied checkpoint (star) to the trial's next stage."""
    fig, ax = plt.subplots(figsize=(9, 5))
    rows_by_run = {a["run"]: r for r in rows for a in r["attempts"][:1]}
    marked = False
    for r in rows:
        reps = r["reports"]
        if not reps:
            continue
        label = f"{r['trial_id']}{' (cpu-demo)' if is_preset(r) else ''}: b{r['base_channels']}, " \
                f"bs{r['batch_size']}, lr {r['lr']:.1e}/{r['lr_d']:.1e}"
        color = ax.plot([x[TIME_ATTR] for x in reps], [x[METRIC] for x in reps], ".-", lw=1.5 if is_preset(r) else 1,
                        label=label)[0].get_color()
        if r["status"].startswith("culled"):
            ax.plot(reps[-1][TIME_ATTR], reps[-1][METRIC], "x", color=color, ms=8)
        for attempt in r["attempts"]:
            if attempt["source"] in (None, attempt["run"]):
                continue
            src = source_point(rows_by_run, attempt)
            after = [x for x in reps if x[TIME_ATTR] > attempt["wall_s"]]
            if src is None or not after:
                continue
            ax.plot([src[0], after[0][TIME_ATTR]], [src[1], after[0][METRIC]], "--", color=color, lw=1)
            ax.plot(*src, "*", color=color, ms=11, label=None if marked else "PBT: checkpoint copied from here")
            marked = True
    ax.axvline(f["time_budget_s"], color="grey", ls=":", lw=1, label=f"budget ({f['time_budget_s']:g} s)")
    ax.set_yscale("log")
    ax.set(xlabel="trainer wall time (s)", ylabel="stage FID / real-data floor (log)",
           title=f"sweep {f['name']} ({f['scheduler']}): FID/floor against wall time, x = culled")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right", ncol=1 if len(rows) <= 8 else 2)
    return save_figure(fig, path)


def retrain_config(row: dict):
    """The GANConfig that retrains ``row``'s configuration from scratch to its best stage (scored
    with as many samples as the sweep's stages, so its stage FID is the trial's)."""
    from trainers.gan import make_config

    c = row["config"]
    cfg = make_config(PRESET, **{k: c[k] for k in HYPER}, train_subset=c["train_subset"], seed=c["seed"],
                      stage_samples=c["stage_samples"], epochs=row["best_epoch"])
    return override(cfg, stages=",".join(str(e) for e in range(0, row["best_epoch"] + 1)))


def schedule(rows_by_run: dict, run: str, until: float, upto: float | None = None) -> list[dict]:
    """The learning rates that made ``run``'s weights up to ``upto`` (its wall time), oldest first:
    each segment is a start of some trial's trainer (its own, or the one whose checkpoint it copied)."""
    starts = [a for a in rows_by_run[run]["attempts"] if a["time"] < until and (upto is None or a["wall_s"] < upto)]
    if not starts:
        return []
    last = starts[-1]
    segment = {"run": run, "from_wall_s": last["wall_s"], "to_wall_s": upto, "from_step": last["from_step"],
               "lr": last["lr"], "lr_d": last["lr_d"] or last["lr"]}
    if last["source"] is None:
        return [segment]
    return schedule(rows_by_run, last["source"], last["time"], last["wall_s"]) + [segment]


def best_json(rows: list[dict], f: dict) -> dict:
    scored = [r for r in rows if r["best_fid_ratio"] is not None]
    if not scored:
        return {"scheduler": f["scheduler"], "best": None}
    best = scored[0]
    out = {"scheduler": f["scheduler"], "metric": METRIC, "time_budget_s": f["time_budget_s"],
           **{k: best[k] for k in ("trial_id", "best_fid_ratio", "best_fid", "best_epoch", "best_wall_s",
                                   "best_classifier_score", "run_dir", "best_checkpoint")},
           "hyperparameters": {k: best[k] for k in HYPER}}
    preset = next((r for r in rows if is_preset(r)), None)
    if preset is not None:
        out["cpu_demo"] = {k: preset[k] for k in ("trial_id", "best_fid_ratio", "best_fid", "best_epoch", "best_wall_s")}
    if f["scheduler"] == "pbt":
        rows_by_run = {a["run"]: r for r in rows for a in r["attempts"][:1]}
        run = best["attempts"][0]["run"]
        out["schedule"] = schedule(rows_by_run, run, math.inf, best["best_wall_s"] + 1e-3)
        out["sample_command"] = f"python trainers/gan.py sample --checkpoint {best['best_checkpoint']} --n 64 " \
                                "--out grid.png"
    else:
        from trainers.gan import make_config

        cfg = retrain_config(best)
        argv = trainer_argv(cfg, make_config(PRESET))
        out.update(argv=["--preset", PRESET, *argv], config=flatten(cfg),
                   command=" ".join(["accelerate launch trainers/gan.py --preset", PRESET, *argv]))
    return out


def log_summary_run(rows: list[dict], f: dict, sweep_dir: Path, figure: Path, best: dict, use_wandb: bool) -> None:
    from trainers.runtime import make_accelerator
    from trainers.tracking import start_tracker

    tracker = start_tracker(make_accelerator("no", use_wandb, sweep_dir), f["wandb_project"], f"{f['name']}-summary",
                            f, sweep_dir, group=f["name"], job_type="sweep-summary", tags=("gan", f["scheduler"]))
    tracker.log_table("sweep/trials", COLUMNS, [[r[c] for c in COLUMNS] for r in rows], step=0)
    tracker.log_images({"sweep/fid_vs_time": figure}, step=0)
    tracker.summary({k: best[k] for k in ("best_fid_ratio", "best_fid", "best_epoch", "trial_id") if k in best})
    tracker.finish()


def write_report(sweep_dir: Path, rows: list[dict] | None = None, wall_s: float | None = None,
                 use_wandb: bool | None = None) -> dict[str, Path]:
    """Write the report of the finished sweep in ``sweep_dir`` (its rows read from it unless given)."""
    sweep_dir, f, rows = ended_sweep(sweep_dir, rows, collect_rows, "tune/gan_sweep.py")
    best = best_json(rows, f)
    paths = {"results": write_text_atomic(sweep_dir / "results.csv", results_csv(rows, COLUMNS)),
             "table": write_text_atomic(sweep_dir / "table.md", table_markdown(rows, f, wall_s)),
             "figure": plot_fid_vs_time(rows, f, sweep_dir / "figures" / "fid_vs_time.png"),
             "best": write_json_atomic(sweep_dir / "best.json", best)}
    log_summary_run(rows, f, sweep_dir, paths["figure"], best, f["wandb"] if use_wandb is None else use_wandb)
    return paths
