"""What a study ran on: the software and hardware a result depends on.

A learning-rate comparison is only as reproducible as the record of what produced it: the
PyTorch and CUDA versions change kernels and numerics, the optimizer code changes with the
ratebench commit, and wall-clock figures mean little without the CPU or GPU they were measured
on. `collect()` describes the process that runs a study (the scheduler's host, or the machine
of `ratebench run`); `node()` is the small description each trial records of the machine it
trained on (`host`, Ray's node address and node id, CPU, the GPUs the trial sees), so a study
spread over a cluster lists every node it used.

Everything here only reads: no CUDA context is created unless CUDA is available and used, and
the git commit is asked of `git` with a short timeout, only when this code runs from a git
checkout (not from an installed package).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["collect", "cpu_model", "git_commit", "node", "numerics"]

_GIT_TIMEOUT_S = 2.0
_CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, in a checkout


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return platform.processor() or None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD's commit when this code runs from a git checkout of ratebench, else None (an
    installed package that happens to sit inside some other repository is not a checkout)."""
    if not (_CHECKOUT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(_CHECKOUT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if len(commit) == 40 else None


def _gpus(detail: bool) -> tuple[list[dict[str, Any]], str | None, int | None]:
    """The CUDA devices this process sees (name, and total memory with `detail`), the CUDA
    version PyTorch was built with and cuDNN's; empty and None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return [], None, None
    gpus: list[dict[str, Any]] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpu: dict[str, Any] = {"name": props.name}
        if detail:
            gpu["memory_gib"] = round(props.total_memory / 2**30, 1)
        gpus.append(gpu)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return gpus, torch.version.cuda, cudnn


@lru_cache(maxsize=1)
def _host() -> dict[str, Any]:
    gpus, cuda, cudnn = _gpus(detail=True)
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ratebench": _version("ratebench"),
        "git_commit": git_commit(),
        "torch": _version("torch"),
        "optuna": _version("optuna"),
        "ray": _version("ray"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda": cuda,
        "cudnn": cudnn,
        "gpus": gpus,
        "numerics": numerics(),
    }


# What decides a CPU trial's rounding (experiments/determinism.py): the instruction set of
# ATen's vectorised kernels and MKL's code path; variables that override them are recorded too.
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
_NUMERIC_VARIABLES = (
    "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS",
)  # fmt: skip


@lru_cache(maxsize=1)
def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.partition(":")[2].split())
                    return [flag for flag in _SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


@lru_cache(maxsize=1)
def numerics() -> dict[str, Any]:
    """What makes a CPU trial's numbers differ between machines: the SIMD level ATen's kernels
    run at, the CPU's SIMD flags, the BLAS (MKL or other) and oneDNN versions, and any variable
    that overrides them. Two machines where these agree give the same numbers bit for bit;
    where they differ, the last digits differ from the first epoch (README: "What reproduces
    where")."""
    import re

    import torch

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.-]+)", config)
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    return {
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_simd": _cpu_flags(),
        "blas": blas[1] if blas else None,
        "mkl": mkl[1] if mkl else None,
        "onednn": onednn[1] if onednn else None,
        "overrides": {k: os.environ[k] for k in _NUMERIC_VARIABLES if k in os.environ},
    }


def collect() -> dict[str, Any]:
    """This process's environment, JSON-safe: versions (Python, ratebench and its git commit
    when run from a checkout, PyTorch, Optuna, Ray when installed), platform, CPU model and
    logical cores, and with CUDA the GPUs (name, total memory) and CUDA/cuDNN versions.
    Gathered once per process (it does not change while the process lives)."""
    return copy.deepcopy(_host())


def _ray_node() -> tuple[str | None, str | None]:
    """Ray's address and id of the node this process runs on; None for both outside Ray. The
    address alone does not tell nodes apart: several nodes on one machine share it."""
    ray = sys.modules.get("ray")  # only where Ray already runs: never start it for this
    if ray is None or not ray.is_initialized():
        return None, None
    try:
        ip: str = ray.util.get_node_ip_address()
        node_id: str = ray.get_runtime_context().get_node_id()
    except Exception:  # best effort: a missing address must not fail a trial
        return None, None
    return ip, node_id


def node() -> dict[str, Any]:
    """The machine a trial runs on, small enough to store with every trial: host name, Ray's
    node address and node id (when in Ray), CPU model, and the names of the GPUs the trial can
    see (Ray sets `CUDA_VISIBLE_DEVICES` per task, so a CPU trial on a GPU machine lists
    none)."""
    try:
        gpus, _, _ = _gpus(detail=False)
    except Exception:  # a broken CUDA set-up is the trial's to report, not this record's
        gpus = []
    ip, node_id = _ray_node()
    return {
        "hostname": socket.gethostname(),
        "ip": ip,
        "ray_node_id": node_id,
        "cpu": cpu_model(),
        "cpu_capability": _capability(),
        "gpus": [gpu["name"] for gpu in gpus],
    }


def _capability() -> str | None:
    """ATen's SIMD level in this process (what a trial's CPU numbers depend on)."""
    try:
        return str(numerics()["aten_cpu_capability"])
    except Exception:  # a broken PyTorch is the trial's to report, not this record's
        return None
