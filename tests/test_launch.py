"""Every file in launch/: each accelerate YAML parses into a valid Accelerate config that matches
its name, the Ray cluster YAML passes Ray's cluster-config schema, and each shell script parses."""
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from conftest import ROOT

LAUNCH = ROOT / "launch"
ACCELERATE_CONFIGS = sorted(p for p in LAUNCH.glob("*.yaml") if p.name != "ray_cluster.yaml")
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def test_every_file_in_launch_is_checked_here():
    checked = {*ACCELERATE_CONFIGS, LAUNCH / "ray_cluster.yaml", *SCRIPTS}
    assert sorted(p.name for p in LAUNCH.iterdir() if p.is_file()) == sorted(p.name for p in checked)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid_and_matches_its_name(path):
    raw = yaml.safe_load(path.read_text())
    # YAML reads a bare NO as the boolean false: Accelerate would then get no distributed type
    assert isinstance(raw["distributed_type"], str), f"{path.name}: quote distributed_type ('NO')"
    cfg = ClusterConfig.from_yaml_file(str(path))      # Accelerate's own loader: unknown keys are refused
    assert isinstance(cfg.distributed_type, DistributedType), cfg.distributed_type
    assert cfg.mixed_precision in ("no", "bf16", "fp16") and cfg.num_machines >= 1
    assert isinstance(cfg.num_processes, int) and cfg.num_processes >= cfg.num_machines
    name = path.stem
    header = path.read_text().splitlines()[0]        # the precision in the name, else in the first comment
    precision = re.search(r"(bf16|fp16)", name) or re.search(r"\b(bf16|fp16)\b", header)
    assert cfg.mixed_precision == (precision.group(1) if precision else "no"), name
    procs = re.search(r"(\d+)proc", name) or re.search(r"gpu_(\d+)", name)
    if procs:
        assert cfg.num_processes == int(procs.group(1)), name
    if cfg.num_processes > 1:
        # several processes go through torchrun (MULTI_GPU); on a CPU-only machine the trainers
        # build their Accelerator with cpu=True and the group runs over gloo
        assert cfg.distributed_type == DistributedType.MULTI_GPU and not cfg.use_cpu, name
    else:
        assert cfg.distributed_type == DistributedType.NO, name
    assert cfg.use_cpu == (name.startswith("cpu_") and cfg.num_processes == 1), name
    if name.startswith("multinode"):
        assert cfg.num_machines > 1 and cfg.num_processes % cfg.num_machines == 0


def test_ray_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((LAUNCH / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))      # raises on a wrong or unknown field
    assert "tune/lstm_sweep.py --address" in (LAUNCH / "ray_cluster.yaml").read_text()


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text().startswith("#!/usr/bin/env bash")
