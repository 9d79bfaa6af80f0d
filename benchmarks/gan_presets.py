"""The cpu-demo preset against a DCGAN sweep's best configuration, each retrained from scratch with
`accelerate launch trainers/gan.py` as a user runs it, on the same machine at the same time.

    python benchmarks/gan_presets.py --best runs/sweeps/gan-sweep/best.json
    python benchmarks/gan_presets.py --best best.json --one-after-the-other   # sequentially, not side by side
    python benchmarks/gan_presets.py --runs "paper-adam=--preset cpu-demo --epochs 6 --batch-size 32 --lr 2e-4 --beta1 0.5"

Each run trains on one thread (cpu-demo's), so on a 2-core CPU the two run side by side by default,
as the sweep's trials do. Prints one row per run (wall time of the whole command, training wall time,
epochs, final FID of 10,000 samples over the real-data floor, classifier score, smallest and largest
class fraction) and writes them to --json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runs_from(best: Path | None, extra: list[str]) -> dict[str, list[str]]:
    """name -> trainers/gan.py flags: cpu-demo, the best.json configuration, and any --runs."""
    runs = {"cpu-demo": ["--preset", "cpu-demo"]}
    if best is not None:
        runs["sweep-best"] = json.loads(best.read_text())["argv"]
    for k, text in enumerate(extra):   # "NAME=FLAGS" or just "FLAGS"
        name, sep, flags = text.partition("=")
        if not sep or name.startswith("-") or " " in name:
            name, flags = f"run{k}", text
        runs[name] = shlex.split(flags)
    return runs


def start(name: str, flags: list[str], out_dir: Path) -> tuple[subprocess.Popen, float]:
    cmd = ["accelerate", "launch", "--num_processes", "1", str(ROOT / "trainers" / "gan.py"), *flags,
           "--run-name", name, "--out-dir", str(out_dir)]
    print("$", " ".join(cmd), flush=True)
    log = open(out_dir / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def row(name: str, flags: list[str], wall_s: float, out_dir: Path) -> dict:
    m = json.loads((out_dir / name / "metrics.json").read_text())
    f = m["final"]
    return {"run": name, "flags": " ".join(flags), "wall_s": round(wall_s, 1), "train_wall_s": m["wall_time_s"],
            "epochs": m["epochs_done"], "fid": round(f["fid"], 2), "fid_floor": round(f["fid_floor"], 2),
            "fid_over_floor": round(f["fid_over_floor"], 2), "classifier_score": round(f["classifier_score"], 2),
            "min_class_pct": round(100 * f["min_class_frac"], 1), "max_class_pct": round(100 * f["max_class_frac"], 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--best", type=Path, help="a DCGAN sweep's best.json (its argv is retrained)")
    ap.add_argument("--runs", nargs="*", default=[], help="more runs, each a quoted \"NAME=FLAGS\" (trainers/gan.py flags)")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/bench/gan_presets"))
    ap.add_argument("--one-after-the-other", action="store_true", help="run them sequentially")
    ap.add_argument("--json", type=Path, help="write the rows here")
    a = ap.parse_args(argv)
    if a.best is not None and not a.best.is_file():
        sys.exit(f"gan_presets: --best {a.best} is not a file; pass a sweep's best.json")
    a.out_dir = a.out_dir.resolve()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    runs, rows = runs_from(a.best, a.runs), []
    batches = [[n] for n in runs] if a.one_after_the_other else [list(runs)]
    for batch in batches:
        started, ended = {n: start(n, runs[n], a.out_dir) for n in batch}, {}
        while len(ended) < len(started):   # each run's wall time ends when it does
            for n, (proc, t0) in started.items():
                if n not in ended and proc.poll() is not None:
                    ended[n] = time.perf_counter() - t0
            time.sleep(0.5)
        for n, (proc, _) in started.items():
            if proc.returncode != 0:
                sys.exit(f"gan_presets: {n} exited with {proc.returncode}; see {a.out_dir / (n + '.log')}")
            rows.append(row(n, runs[n], ended[n], a.out_dir))
    cols = ["run", "wall_s", "train_wall_s", "epochs", "fid", "fid_floor", "fid_over_floor", "classifier_score",
            "min_class_pct", "max_class_pct"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
