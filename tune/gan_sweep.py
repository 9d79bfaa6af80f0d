"""Ray Tune sweep of the DCGAN trainer: the lowest FID a configuration reaches within a wall-time budget.

It draws G's and D's learning rates, Adam's beta1, the EMA decay, the batch size and the width.

    python tune/gan_sweep.py                                  # ASHA over fixed configurations: <= 60 min on a 2-core CPU
    python tune/gan_sweep.py --quick                          # <= 10 min: 6 short trials on 8,000 images
    python tune/gan_sweep.py --scheduler pbt                  # Population Based Training of G's and D's learning rates
    python tune/gan_sweep.py --time-budget-s 300              # what each configuration reaches in 5 minutes
    python tune/gan_sweep.py --address HEAD:6379 --gpus-per-trial 0.25   # join a running Ray cluster
    python tune/gan_sweep.py --quick --resume                 # continue an interrupted sweep (Ctrl-C once)

Each trial is ``trainers.gan.train(GANConfig)``, the CLI's own loop, from the cpu-demo preset with the
sampled values on top, in its own run folder. After every epoch it scores a stage (FID of
--stage-samples images against the MNIST test set) and reports the FID over the real-data floor of
as many images (``fid_ratio``, lower is better) with the stage's checkpoint, through Ray's public
Checkpoint API. A trial ends when the next epoch would end past --time-budget-s of the trainer's wall
time, when ASHA culls it (default), or at --epochs; its metrics.json and wandb run say which.

- ASHA (default) compares configurations at fixed wall times (--grace-period-s, times
  --reduction-factor) and stops the worse ones; every result is a configuration the trainer reruns
  from scratch: best.json holds the trainers/gan.py command.
- PBT (``--scheduler pbt``): a population of the cpu-demo configuration with sampled learning rates;
  every --perturbation-interval-s the worst quarter copies a better trial's checkpoint (restored
  through the trainer's --resume) and perturbs its learning rates. best.json holds the best
  trial's checkpoint and the schedule of learning rates that made it.

Writes <out-dir>/sweeps/<name>/: sweep.json (the flags), tune/ (Ray's experiment state, with the
reported checkpoints), trials/<run>/ (the trainer's run folders) and, once every trial has ended,
results.csv, table.md, figures/fid_vs_time.png and best.json (tune/gan_report.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from trainers.checkpoint import checkpoint_name, read_meta
from trainers.cli import (UsageError, check_choices, flatten, override, require_at_least,
                          require_non_negative, require_positive, run_cli)
from trainers.files import write_json_atomic
from trainers.gan import GANConfig, make_config, train
from tune import common, gan_report
from tune.common import Floats, Ints, check_list
from tune.gan_report import ATTEMPTS, METRIC, PRESET, TIME_ATTR, preset_point   # the schedulers' metric and clock

CULLED = "culled"             # <sweep>/culled/<trial id>: ASHA's verdict on a trial it culls
RECORDED = "recorded"         # <sweep>/recorded/<trial id>: the last step Tune recorded as the trial started
TIME_BUDGET = "time budget"   # stop_reason of a trial whose next epoch would end past --time-budget-s
NEXT_END = "next_end_s"       # reported: the wall time the next epoch would end at, as long as the last
EPOCH_TIME = "epoch_time.json"   # in a reported checkpoint: the wall time and the last epoch's length


# --- config ----------------------------------------------------------------------------------

@dataclass
class Search:
    """search space (ASHA draws every field; PBT the learning rates, the rest at cpu-demo's value or the list's first)"""
    lr_g: Floats = (1e-4, 1e-3)  # G's learning rate: log-uniform between the two
    lr_d: Floats = (5e-5, 8e-4)  # D's learning rate: log-uniform between the two
    beta1s: Floats = (0.3, 0.5, 0.7)  # Adam's beta1 of both (uniform choice)
    ema_decays: Floats = (0.99, 0.995, 0.999)  # decay of the EMA of G that samples (uniform choice)
    batch_sizes: Ints = (16, 32, 64)  # batch sizes (uniform choice)
    widths: Ints = (16, 24)  # base_channels b of G and D (uniform choice); G's cost grows as b^2
    num_samples: int = 16  # ASHA: configurations drawn (the first is cpu-demo's own when the space holds it); PBT: population


@dataclass
class Trial:
    """every trial (the rest of GANConfig is the cpu-demo preset)"""
    time_budget_s: float = 480.0  # wall time of the trainer per trial: no epoch is started that would end past it
    epochs: int = 30  # most epochs of a trial (the budget ends most trials first)
    train_subset: int = 0  # train on the first N MNIST images only (0: all 60,000)
    stage_samples: int = 2000  # images scored after every epoch (the floor: as many real images)
    seed: int = 0  # seed of every trial (weights, data order, noise) and of the draws


@dataclass
class Scheduling(common.Resources):
    """scheduling and resources"""
    scheduler: Literal["asha", "pbt"] = "asha"  # asha: fixed configurations; pbt: Population Based Training
    grace_period_s: float = 120.0  # ASHA: wall seconds before a trial can be stopped
    reduction_factor: float = 3.0  # ASHA: keep the best 1/rf of the trials at each rung
    perturbation_interval_s: float = 120.0  # PBT: wall seconds between exploit/explore steps of a trial


@dataclass
class Output(common.Output):
    """output"""
    name: str = "gan-sweep"  # sweep name: folder and wandb group (--quick: gan-quick)
    quick: bool = False  # the quick preset: 8,000 images, 60 s trials, 6 draws (flags given still apply)


@dataclass
class GanSweepConfig:
    """Ray Tune sweep of the DCGAN trainer: the lowest FID within a wall-time budget."""
    search: Search = field(default_factory=Search)  # search space (ASHA draws all; PBT the learning rates)
    trial: Trial = field(default_factory=Trial)  # every trial (the rest of GANConfig is the cpu-demo preset)
    scheduling: Scheduling = field(default_factory=Scheduling)  # scheduling and resources
    output: Output = field(default_factory=Output)  # output

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output.out_dir).expanduser().resolve() / "sweeps" / self.output.name

    def validate(self) -> None:
        check_choices(self)
        s, t, sch = self.search, self.trial, self.scheduling
        for name, low in (("lr_g", None), ("lr_d", None), ("beta1s", 0), ("ema_decays", 0), ("batch_sizes", 1),
                          ("widths", 1)):
            check_list(getattr(s, name), name, low=low)
        for name in ("lr_g", "lr_d"):
            lo, hi = (getattr(s, name) * 2)[:2]
            if len(getattr(s, name)) != 2 or not 0 < lo <= hi:
                raise UsageError(f"--{name.replace('_', '-')} takes two positive numbers, low then high, "
                                 f"got {getattr(s, name)}")
        for name in ("time_budget_s", "grace_period_s", "perturbation_interval_s", "cpus_per_trial"):
            require_positive(flatten(self)[name], name)
        require_non_negative(sch.gpus_per_trial, "gpus_per_trial")
        for low, names in ((1, ("num_samples", "epochs")), (2, ("stage_samples",)),
                           (0, ("train_subset", "max_failures", "num_cpus"))):
            for name in names:
                require_at_least(flatten(self)[name], low, name)
        for ok, why in ((sch.grace_period_s <= t.time_budget_s, f"--grace-period-s ({sch.grace_period_s:g}) must not "
                                                               f"exceed --time-budget-s ({t.time_budget_s:g})"),
                        (sch.reduction_factor > 1, f"--reduction-factor must be > 1, got {sch.reduction_factor}"),
                        (t.stage_samples <= 10_000, f"--stage-samples must be at most 10000 (the real-data floor's "
                                                    f"images), got {t.stage_samples}")):
            if not ok:
                raise UsageError(why)
        common.check_output(self)


# The quick preset: 8,000 images (an epoch in ~10 s at cpu-demo's size), one-minute trials, six draws.
QUICK = dict(train_subset=8000, time_budget_s=60.0, stage_samples=1000, num_samples=6, grace_period_s=20.0,
             perturbation_interval_s=20.0, name="gan-quick")


def parse_sweep(argv: Sequence[str] | None, prog: str, description: str) -> GanSweepConfig:
    """The command line -> a validated GanSweepConfig; with --quick the preset replaces the defaults."""
    return common.parse_with_preset(GanSweepConfig, QUICK, argv, prog, description)


# --- one trial (runs inside a Ray worker) --------------------------------------------------------

def trial_config(config: dict, trial_id: str) -> GANConfig:
    """A trial's trainer config: the cpu-demo preset, then its Tune config (GANConfig fields: the
    sweep's fixed settings and the sampled point); its run folder is named after the trial id."""
    fields = set(flatten(GANConfig())) - {"preset", "config"}
    cfg = make_config(PRESET, **{k: v for k, v in config.items() if k in fields})
    return override(cfg, run_name=f"gan-b{cfg.model.base_channels}-bs{cfg.optim.batch_size}-{trial_id}")


def restore_checkpoint(run_dir: Path) -> dict:
    """Put the checkpoint Tune hands this (re)starting trial into its run folder as the only one the
    trainer's --resume finds. It is the trial's own (a retry, --resume) or, under PBT, the better
    trial's it exploits. Returns where it continues: ``{"from_step", "source", "wall_s"}``."""
    from ray import tune

    restored = tune.get_checkpoint()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)   # a later one of this trial's is not its past
    (run_dir / "metrics.json").unlink(missing_ok=True)   # an earlier attempt's; written again at the end
    if restored is None:
        return {"from_step": 0, "source": None, "wall_s": 0.0, "epoch_s": 0.0}
    with restored.as_directory() as folder:
        meta = read_meta(Path(folder))
        shutil.copytree(folder, run_dir / "checkpoints" / checkpoint_name(meta["step"]))
        epoch_s = json.loads((Path(folder) / EPOCH_TIME).read_text())["epoch_s"]
    return {"from_step": meta["step"], "source": meta["config"]["run_name"], "wall_s": meta["extra"]["wall_time"],
            "epoch_s": epoch_s}


def budget_used(wall_s: float, epoch_s: float, budget_s: float) -> bool:
    """The time budget's rule: no epoch is started that, as long as the last one, would end at or past it."""
    return wall_s + epoch_s >= budget_s


def run_trial(config: dict) -> None:
    """The Tune function trainable: one trainer run, reporting each stage with its checkpoint.

    A (re)started trial continues from the checkpoint Tune gives it (restore_checkpoint), so its
    run and Tune's record of it agree: every stage is reported once. It ends itself (a finished
    metrics.json and wandb run) when ASHA culls it, at the time budget or at --epochs."""
    from ray import tune
    from ray.tune import Checkpoint

    from trainers.gan_metrics import scorer_for
    from tune.asha import CULLED_BY_ASHA
    from tune.record import recorded

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config, trial_id)
    run_dir, budget = cfg.run_dir, float(config["time_budget_s"])
    verdict = Path(config["sweep_dir"]) / CULLED / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    start = restore_checkpoint(run_dir)
    # a stage Tune has already (its report arrived, its checkpoint was not recorded: an interrupt
    # in between) is not sent again, and the run ends where Tune's record of it ended; after a PBT
    # exploitation the trial's stages are new ones
    own = start["source"] in (None, cfg.name)
    tune_has = recorded(Path(config["sweep_dir"]) / RECORDED, trial_id) if own else {"step": 0}
    recorded_step = tune_has["step"]
    with open(run_dir / ATTEMPTS, "a") as f:
        f.write(json.dumps({**start, "run": cfg.name, "lr": cfg.optim.lr, "lr_d": cfg.optim.lr_d,
                            "time": time.time(), "pid": os.getpid()}) + "\n")
    if start["from_step"] and budget_used(start["wall_s"], start["epoch_s"], budget):
        # the checkpoint Tune hands over (PBT: a trial that ended at the budget) used the budget:
        # end at once, with the trainer's record of the run up to it
        train(override(cfg, resume=True), stop_reason=TIME_BUDGET)
        return
    device = "cuda" if config.get("gpus", 0) > 0 else "cpu"
    floor = scorer_for(device).floor(n=cfg.eval.stage_samples)["fid"]   # real images, as many as a stage scores
    last_wall, final = [start["wall_s"]], []

    def on_stage(step: int, numbers: dict, ckpt: Path) -> str | None:
        """Report the stage with its checkpoint (which keeps the epoch's time, for a restart), then
        end the run if ASHA culled it (the verdict is on disk once Tune answers) or the budget is
        used. The last stage of a run is reported after the trainer has written its record:
        whatever Tune or PBT then does with the trial (stop it, pause it) finds the record done."""
        wall, epoch_s = numbers["wall_s"], numbers["wall_s"] - last_wall[0]
        last_wall[0] = wall
        write_json_atomic(ckpt / EPOCH_TIME, {"wall_s": wall, "epoch_s": epoch_s})
        result = {METRIC: numbers["eval/fid"] / floor, "fid": numbers["eval/fid"], "floor_fid": floor,
                  "classifier_score": numbers["eval/classifier_score"], "epoch": numbers["epoch"], "step": step,
                  "min_class_frac": numbers["eval/min_class_frac"], "max_class_frac": numbers["eval/max_class_frac"],
                  TIME_ATTR: wall, "epoch_s": epoch_s, NEXT_END: wall + epoch_s}
        if step < recorded_step:   # a stage Tune has: its verdict then, not this run's timing, holds
            return None
        if step == recorded_step:
            if tune_has.get(NEXT_END, 0) >= budget:
                return TIME_BUDGET
            return (verdict.read_text().strip() or CULLED_BY_ASHA) if verdict.exists() else None
        report = (result, Checkpoint.from_directory(str(ckpt)))
        if budget_used(wall, epoch_s, budget) or numbers["epoch"] == cfg.optim.epochs:
            final.append(report)
            return TIME_BUDGET if budget_used(wall, epoch_s, budget) else None
        tune.report(report[0], checkpoint=report[1])
        if verdict.exists():
            return verdict.read_text().strip() or CULLED_BY_ASHA
        return None

    train(override(cfg, resume=start["from_step"] > 0), on_stage=on_stage)
    if final:
        tune.report(final[0][0], checkpoint=final[0][1])


def trial_dirname(trial) -> str:
    return f"gan-{trial.trial_id}"


# --- the search space and the schedulers ---------------------------------------------------------

def fixed_trial_settings(sc: GanSweepConfig) -> dict:
    """GANConfig fields shared by every trial (in the param space, so --resume keeps them), plus
    the budget and the sweep folder the trial reads."""
    t, out = sc.trial, sc.output
    return dict(epochs=t.epochs, stages=",".join(str(e) for e in range(1, t.epochs + 1)), train_subset=t.train_subset,
                stage_samples=t.stage_samples, seed=t.seed, checkpoint_every=10 ** 9, keep_checkpoints=2,
                out_dir=str(sc.sweep_dir / "trials"), wandb=out.wandb, wandb_project=out.wandb_project,
                wandb_group=out.name, wandb_job_type="sweep-trial", progress=False,
                num_threads=max(1, int(sc.scheduling.cpus_per_trial)), time_budget_s=t.time_budget_s,
                sweep_dir=str(sc.sweep_dir), gpus=sc.scheduling.gpus_per_trial)


def check_trial_configs(sc: GanSweepConfig) -> None:
    """Validate a trial config at the corners of the space before any worker starts."""
    s, fixed = sc.search, fixed_trial_settings(sc)
    for k in range(2):
        point = {"lr": s.lr_g[k], "lr_d": s.lr_d[k], "beta1": s.beta1s[-k], "ema_decay": s.ema_decays[-k],
                 "batch_size": max(s.batch_sizes), "base_channels": s.widths[-k]}
        cfg = trial_config({**fixed, **point}, "check")
        images = cfg.data.train_subset or 60_000
        if cfg.optim.batch_size > images:
            raise UsageError(f"--batch-sizes {cfg.optim.batch_size} exceeds the {images} training images; "
                             "lower it or raise --train-subset")


def build_tuner(sc: GanSweepConfig, trainable, callbacks=None, verbose: int = 1):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from tune.record import RecordedSteps

    s, sch = sc.search, sc.scheduling
    lr_space = {"lr": tune.loguniform(*s.lr_g), "lr_d": tune.loguniform(*s.lr_d)}
    preset = preset_point()
    choices = {"beta1": s.beta1s, "ema_decay": s.ema_decays, "batch_size": s.batch_sizes, "base_channels": s.widths}
    if sch.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        # every other field at cpu-demo's value, or the list's first where the list lacks it
        param_space = {**{k: preset[k] if preset[k] in v else v[0] for k, v in choices.items()}, **lr_space}
        scheduler = PopulationBasedTraining(time_attr=TIME_ATTR, metric=METRIC, mode="min",
                                            perturbation_interval=sch.perturbation_interval_s,
                                            hyperparam_mutations=lr_space)
        first = []
    else:
        from tune.asha import GroupedASHA

        param_space = {**lr_space, **{k: tune.choice(list(v)) for k, v in choices.items()}}
        # one ASHA over every trial (no grouping); a culled trial ends itself with a finished record
        scheduler = GroupedASHA((), metric=METRIC, mode="min", time_attr=TIME_ATTR, max_t=sc.trial.time_budget_s,
                                grace_period=sch.grace_period_s, reduction_factor=sch.reduction_factor,
                                cull_dir=str(sc.sweep_dir / CULLED))
        in_space = all(preset[k] in v for k, v in choices.items()) and all(
            lo <= preset[k] <= hi for k, (lo, hi) in (("lr", s.lr_g), ("lr_d", s.lr_d)))
        first = [preset] if in_space else []   # the baseline, scored like every other draw
    return tune.Tuner(
        trainable,
        param_space={**param_space, **fixed_trial_settings(sc)},
        tune_config=tune.TuneConfig(num_samples=s.num_samples, scheduler=scheduler, reuse_actors=True,
                                    search_alg=BasicVariantGenerator(points_to_evaluate=first,
                                                                     random_state=sc.trial.seed),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(sc.sweep_dir), verbose=verbose,
            callbacks=[*(callbacks or []), RecordedSteps(str(sc.sweep_dir / RECORDED), "step", keep=(NEXT_END,))],
            failure_config=tune.FailureConfig(max_failures=sch.max_failures),
            # the budget as Tune's own stop condition too: a trial's last report (sent once its record
            # is written) ends it, so no scheduler (PBT's perturbation) pauses a trial that is done
            stop={NEXT_END: sc.trial.time_budget_s},
            # ASHA: the latest checkpoint (what a retry resumes) and the best one (best.json); PBT: every
            # one (a trial may copy one its source has since passed, which Tune would otherwise delete)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sch.scheduler == "pbt" else 1,
                                                    checkpoint_score_attribute=METRIC, checkpoint_score_order="min")))


# --- the driver ----------------------------------------------------------------------------------

run_sweep = common.sweep_runner(run_trial, build_tuner, check_trial_configs, gan_report.collect_rows,
                                gan_report.write_report)
main = common.sweep_main("tune.gan_sweep")

if __name__ == "__main__":
    run_cli(main)
