"""`worker.environment`: what a study records about the machines it ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from worker import environment

REPO = Path(__file__).resolve().parents[2]


def test_collect_describes_this_process_in_json_safe_values() -> None:
    env = environment.collect()
    assert json.loads(json.dumps(env)) == env  # stored as a JSON column
    assert env["python"] == platform.python_version()
    assert env["torch"] is not None and env["torch"].split("+")[0] in torch.__version__
    assert isinstance(env["optuna"], str) and isinstance(env["ray"], str)
    assert isinstance(env["ratebench"], str)
    assert env["cpu_count"] == os.cpu_count()
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert isinstance(env["platform"], str) and isinstance(env["hostname"], str)
    assert isinstance(env["gpus"], list)
    if torch.cuda.is_available():
        assert len(env["gpus"]) == torch.cuda.device_count()
        assert all(g["name"] and g["memory_gib"] > 0 for g in env["gpus"])
        assert env["cuda"] == torch.version.cuda
    else:
        assert env["gpus"] == [] and env["cuda"] is None and env["cudnn"] is None


def test_collect_records_what_decides_a_cpu_trials_rounding() -> None:
    """experiments/determinism.py: ATen's SIMD level and MKL's code path change a trial's
    numbers from the first epoch; a study records them, to tell such a difference from a bug."""
    numerics = environment.collect()["numerics"]
    assert numerics["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert numerics["blas"] and numerics["onednn"]
    assert set(numerics["cpu_simd"]) <= set(environment._SIMD_FLAGS)
    assert numerics["overrides"] == {
        k: os.environ[k] for k in environment._NUMERIC_VARIABLES if k in os.environ
    }


def test_collect_returns_a_copy_each_time() -> None:
    first = environment.collect()
    first["gpus"].append({"name": "changed by the caller"})
    assert {"name": "changed by the caller"} not in environment.collect()["gpus"]


def test_git_commit_is_heads_in_a_checkout() -> None:
    if not (REPO / ".git").exists():
        assert environment.git_commit() is None
        return
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert environment.collect()["git_commit"] == head


def test_node_is_small_and_names_this_machine() -> None:
    node = environment.node()
    assert set(node) == {"hostname", "ip", "ray_node_id", "cpu", "cpu_capability", "gpus"}
    assert node["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert node["hostname"] == environment.collect()["hostname"]
    assert node["cpu"] == environment.cpu_model()
    assert node["gpus"] == [g["name"] for g in environment.collect()["gpus"]]
    assert len(json.dumps(node)) < 500  # stored with every trial
