"""Every file in launch/: one accelerate YAML per topology, each a valid Accelerate config that matches
its name, with precision left to a flag; the two-process CPU config really starts two CPU processes
over gloo with every GPU hidden; the Ray cluster YAML passes Ray's cluster-config schema; each shell
script parses."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from conftest import ROOT, clean_env, free_port

LAUNCH = ROOT / "launch"
ACCELERATE_CONFIGS = sorted(p for p in LAUNCH.glob("*.yaml") if p.name != "ray_cluster.yaml")
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
TOPOLOGIES = {"cpu_1proc", "cpu_2proc", "gpu_1", "gpu_node", "multinode"}


def test_every_file_in_launch_is_checked_here():
    checked = {*ACCELERATE_CONFIGS, LAUNCH / "ray_cluster.yaml", *SCRIPTS}
    assert sorted(p.name for p in LAUNCH.iterdir() if p.is_file()) == sorted(p.name for p in checked)
    assert {p.stem for p in ACCELERATE_CONFIGS} == TOPOLOGIES      # one config per topology


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid_and_matches_its_name(path):
    raw = yaml.safe_load(path.read_text())
    # YAML reads a bare NO as the boolean false: Accelerate would then get no distributed type
    assert isinstance(raw["distributed_type"], str), f"{path.name}: quote distributed_type ('NO')"
    cfg = ClusterConfig.from_yaml_file(str(path))      # Accelerate's own loader: unknown keys are refused
    assert isinstance(cfg.distributed_type, DistributedType), cfg.distributed_type
    assert cfg.num_machines >= 1 and isinstance(cfg.num_processes, int)
    name = path.stem
    # precision is a flag of the launch or of the trainer, never a config of its own; the header says how
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert cfg.mixed_precision == "no", name
    assert "--mixed_precision bf16" in header and "--mixed-precision bf16" in header, name
    if name == "gpu_node":
        # the node's GPU count is given at launch; Accelerate refuses to start without it
        assert cfg.num_processes == -1 and "--num_processes" in header
    else:
        assert cfg.num_processes >= cfg.num_machines
    procs = {"cpu_1proc": 1, "cpu_2proc": 2, "gpu_1": 1}.get(name)
    if procs:
        assert cfg.num_processes == procs, name
    # several processes go through torchrun (MULTI_GPU): MULTI_CPU would need mpirun
    several = cfg.num_processes != 1
    assert cfg.distributed_type == (DistributedType.MULTI_GPU if several else DistributedType.NO), name
    assert cfg.use_cpu == name.startswith("cpu_"), name
    if name.startswith("cpu_") and several:
        # gpu_ids becomes CUDA_VISIBLE_DEVICES; CUDA shows only the ids before the first invalid one
        ids = str(cfg.gpu_ids).split(",")
        assert len(ids) >= 2 and int(ids[0]) < 0, cfg.gpu_ids
    if name.startswith("multinode"):
        assert cfg.num_machines > 1 and cfg.num_processes % cfg.num_machines == 0


REPORT = """\
import json, os, torch, torch.distributed as dist
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())   # as trainers/runtime.py builds it
print(json.dumps({"rank": acc.process_index, "world": acc.num_processes, "device": acc.device.type,
                  "backend": dist.get_backend(), "cuda_devices": torch.cuda.device_count(),
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
"""


def test_cpu_2proc_starts_two_cpu_processes_over_gloo_with_every_gpu_hidden(tmp_path):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(LAUNCH / "cpu_2proc.yaml"),
                           "--main_process_port", str(free_port()), str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=clean_env(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], proc.stdout
    for r in ranks:
        assert r["world"] == 2 and r["device"] == "cpu" and r["backend"] == "gloo" and r["cuda_devices"] == 0, r
        assert r["visible"].split(",")[0] == "-1", r      # hidden on a machine with GPUs too


def test_gpu_node_asks_for_the_gpu_count(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("")
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(LAUNCH / "gpu_node.yaml"), str(script)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean_env(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin"))
    assert proc.returncode != 0 and "--num_processes" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_ray_cluster_yaml_passes_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((LAUNCH / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, schema)      # raises on a wrong or unknown field
    assert "tune/lstm_sweep.py --address" in (LAUNCH / "ray_cluster.yaml").read_text()


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text().startswith("#!/usr/bin/env bash")


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_stops_at_once_with_one_line_without_a_gpu_or_its_packages(tmp_path):
    """On a machine without CUDA it names the missing GPU; with a Python that lacks its packages it
    names them; either way one line, exit 2, nothing written."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.sh runs in full here")
    results = ROOT / "benchmarks" / "results" / "gpu"
    before = sorted(results.rglob("*")) if results.exists() else []
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHON=sys.executable))
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout[-2000:])
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible to torch; run it on a GPU machine"], proc.stderr
    bare = tmp_path / "python"        # the interpreter without its site-packages: no torch, no tyro, ...
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    proc = subprocess.run(["bash", str(GPU_CHECK)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHON=str(bare)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("gpu_check: missing Python packages: torch torchvision accelerate"), lines[0]
    assert (sorted(results.rglob("*")) if results.exists() else []) == before
