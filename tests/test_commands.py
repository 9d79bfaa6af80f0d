"""Documented commands that are not trainers, run as users run them at a tiny size: the evaluation
floor (`python -m trainers.gan_metrics`) and each benchmark script. They print figures, so the checks
are that each runs to the end and that what it writes agrees with what it prints."""
import json
import re
import subprocess

import pytest

from conftest import ROOT, run_script


def ok(proc):
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_gan_metrics_module_prints_the_real_data_floor():
    out = ok(run_script(["-m", "trainers.gan_metrics", "--threads", "1"], timeout=600))
    assert "real-data floor: 10,000 MNIST training images" in out
    fid = re.search(r"FID vs MNIST test \(classifier features\)\s+([\d.]+)\s+([\d.]+)", out)
    assert fid and 0 < float(fid.group(1)) < 4 and float(fid.group(2)) > 0, out   # 10,000 and 2,000 real images
    score = re.search(r"classifier score exp\(E KL\)\s+([\d.]+)", out)
    assert score and float(score.group(1)) > 9.5, out
    assert "stage_metrics of the untrained generator: eval/fid" in out


def test_gan_speed_benchmark_at_a_tiny_size():
    out = ok(run_script(["benchmarks/gan_speed.py", "--base-channels", "4", "--batch-size", "8", "--steps", "2",
                         "--rounds", "1"]))
    rows = dict(re.findall(r"^(trainer|plain)\s+\d+\s+([\d.]+)x$", out, re.M))
    assert float(rows["plain"]) == 1.0 and float(rows["trainer"]) > 0, out
    assert re.search(r"goal trainer/plain >= 1.05x: [\d.]+x", out)


def test_lstm_speed_benchmark_at_a_tiny_size(tmp_path):
    variants = ["report-loop", "eager", "script", "script-ts", "nn.LSTM"]   # compile: minutes of compiling
    ok(run_script(["benchmarks/lstm_speed.py", "--sizes", "4,8,3", "--rounds", "1", "--warmup", "1",
                   "--threads", "1", "--variants", *variants, "--json", tmp_path / "speed.json"]))
    report = json.loads((tmp_path / "speed.json").read_text())
    text = json.dumps(report)
    for variant in variants:
        assert f'"{variant}"' in text, variant


def test_lstm_accuracy_benchmark_at_a_tiny_size(tmp_path):
    out = ok(run_script(["benchmarks/lstm_accuracy.py", "--rows", "lstm:3,rnn/scalar:3", "--steps", "20",
                         "--json", tmp_path / "acc.json"]))
    rows = json.loads((tmp_path / "acc.json").read_text())
    assert [r["row"] for r in rows] == ["lstm:3", "rnn/scalar:3"] and all(r["steps"] == 20 for r in rows)
    for r in rows:   # the table prints what the file holds
        assert f"{100 * r['val_acc']:.2f}%" in out


def test_scaling_benchmark_at_a_tiny_size(tmp_path):
    out = ok(run_script(["benchmarks/scaling.py", "--trainers", "lstm", "--rounds", "1", "--steps", "10",
                         "--json", tmp_path / "scaling.json"]))
    r = json.loads((tmp_path / "scaling.json").read_text())["lstm"]
    assert r["ratio"] == pytest.approx(r["2proc_samples_per_s"] / r["1proc_samples_per_s"])
    for procs in ("1proc", "2proc"):   # the table prints what the file holds
        x = r[procs]
        assert f"| lstm | {procs[0]} | {x['samples_per_s']:.0f} | {x['eval_s']:.1f} | {x['wall_s']:.1f} |" in out
    paper = ok(run_script(["benchmarks/scaling.py", "--paper"]))
    assert "gradients all-reduced per iteration" in paper


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.sh")), ids=lambda p: p.name)
def test_benchmark_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
