"""Peak memory and time of one hypergradient: reversible SGD vs naive unrolled autograd.

Both compute ∂ val_loss / ∂ (lr, momentum, init scale, L2) for the same problem — a ReLU MLP
40-64-64-10 on synthetic teacher data, batch 32, float64, T steps of SGD with momentum, a
10-block schedule — by `optim.hypergrad.hypergradient` (exact fixed-point run forward, then
backward) and by `optim.hypergrad.unrolled_hypergradient` (autograd through the unrolled run).

Memory is measured two ways, both stated in the JSON:
- `rss_peak_bytes`: growth of the process's peak resident set (Linux `VmHWM`, reset by writing
  5 to /proc/self/clear_refs after `gc.collect()` and glibc `malloc_trim(0)`), i.e. every
  byte torch, numpy and Python touched during the call. `null` where /proc is unavailable.
- `autograd_saved_bytes`: bytes of the distinct tensor storages autograd saves for backward
  (counted with `torch.autograd.graph.saved_tensors_hooks`): for the unrolled method all of
  them (the whole graph is alive at the end of the forward pass); for the reversible method
  the largest single step (each step's graph is freed before the next). The reversible
  method's own state (fixed-point weights and velocities, buffer heads and words) is
  reported as `state_bytes`.
Times are wall-clock seconds of one whole hypergradient. For every T the two methods run
interleaved, `--repeats` times each; the JSON gives medians and ratios (reversible /
unrolled). Run: `python bench/hypergrad_memory.py [--steps 100 500 2000] [--out file.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optim.hypergrad import Hyperparameters, Problem, mlp_base_params, mlp_loss
from optim.hypergrad.reversible import init_state, reverse, train_forward, validation_gradient
from optim.hypergrad.unrolled import unrolled_hypergradient

SIZES = (40, 64, 64, 10)
BATCH = 32


def make_problem(steps: int) -> Problem:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(SIZES[0], SIZES[-1], generator=gen, dtype=torch.float64)
    x = torch.randn(1200, SIZES[0], generator=gen, dtype=torch.float64)
    y = (x @ teacher).argmax(1)
    return Problem(
        base_params=mlp_base_params(SIZES, 0),
        loss=mlp_loss,
        train_x=x[:1000],
        train_y=y[:1000],
        val_x=x[1000:],
        val_y=y[1000:],
        steps=steps,
        batch_size=BATCH,
        seed=0,
    )


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: skip the trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_peak(fn: Callable[[], Any]) -> tuple[Any, float, int | None]:
    """(result, seconds, growth of peak RSS in bytes or None)."""
    _trim()
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        base = None
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return result, seconds, None if base is None or peak is None else 1024 * (peak - base)


def reversible_run(problem: Problem, hyper: Hyperparameters) -> dict[str, Any]:
    """The body of `hypergradient`, unrolled here to read the state's size at its largest."""
    values = hyper.values()
    state = init_state(problem, values)
    train_forward(problem, values, state, problem.steps)
    nbytes = state.nbytes()
    _, dw = validation_gradient(problem, state)
    grad, _ = reverse(problem, values, state, dw)
    return {"grad": grad, "state_bytes": sum(nbytes.values()), "buffer": nbytes}


def unrolled_run(problem: Problem, hyper: Hyperparameters) -> dict[str, Any]:
    return {"grad": unrolled_hypergradient(problem, hyper).grad}


class SavedBytes:
    """Counts distinct storages autograd saves; `per_step` resets the count at each loss call."""

    def __init__(self, per_step: bool) -> None:
        self.per_step = per_step
        self.current: dict[int, int] = {}
        self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.current[storage.data_ptr()] = storage.nbytes()
        return t

    def new_step(self) -> None:
        self.peak = max(self.peak, sum(self.current.values()))
        if self.per_step:
            self.current = {}

    def measure(self, run: Callable[[Problem, Hyperparameters], Any], problem: Problem) -> int:
        def loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.new_step()
            return mlp_loss(params, x, y)

        counted = Problem(**{**problem.__dict__, "loss": loss})
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            run(counted, HYPER)
        self.new_step()
        return self.peak


HYPER = Hyperparameters.constant(len(SIZES) * 2 - 2, 10, lr=0.05, momentum=0.9, l2=1e-4)


def _max_rel_diff(a: Hyperparameters, b: Hyperparameters) -> float:
    return max(
        float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))
        for x, y in zip(a.fields().values(), b.fields().values(), strict=True)
    )


def bench_steps(steps: int, repeats: int) -> dict[str, Any]:
    problem = make_problem(steps)
    runs: dict[str, dict[str, list[Any]]] = {
        "reversible": {"seconds": [], "rss": []},
        "unrolled": {"seconds": [], "rss": []},
    }
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, run in (("reversible", reversible_run), ("unrolled", unrolled_run)):
            results[name], seconds, peak = _rss_peak(functools.partial(run, problem, HYPER))
            runs[name]["seconds"].append(seconds)
            runs[name]["rss"].append(peak)
    row: dict[str, Any] = {"steps": steps}
    for name, per_step in (("reversible", True), ("unrolled", False)):
        peaks = [r for r in runs[name]["rss"] if r is not None]
        row[name] = {
            "seconds": statistics.median(runs[name]["seconds"]),
            "rss_peak_bytes": int(statistics.median(peaks)) if peaks else None,
            "autograd_saved_bytes": SavedBytes(per_step).measure(
                reversible_run if per_step else unrolled_run, problem
            ),
        }
    row["reversible"]["state_bytes"] = results["reversible"]["state_bytes"]
    row["reversible"]["state_parts"] = results["reversible"]["buffer"]
    rev, unr = row["reversible"], row["unrolled"]
    row["ratio_reversible_over_unrolled"] = {
        "seconds": rev["seconds"] / unr["seconds"],
        "rss_peak_bytes": (
            rev["rss_peak_bytes"] / unr["rss_peak_bytes"]
            if rev["rss_peak_bytes"] and unr["rss_peak_bytes"]
            else None
        ),
        "held_bytes": (rev["autograd_saved_bytes"] + rev["state_bytes"])
        / unr["autograd_saved_bytes"],
    }
    row["hypergradient_max_rel_diff"] = _max_rel_diff(
        results["reversible"]["grad"], results["unrolled"]["grad"]
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 250, 500, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small net)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warm = make_problem(20)  # first calls pay one-off allocations and lazy imports
    reversible_run(warm, HYPER)
    unrolled_run(warm, HYPER)
    rows = [bench_steps(t, args.repeats) for t in args.steps]
    report = {
        "benchmark": "hypergrad_memory",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "problem": {
            "model": "mlp " + "-".join(map(str, SIZES)),
            "parameters": sum(p.numel() for p in mlp_base_params(SIZES, 0)),
            "batch_size": BATCH,
            "dtype": "float64",
            "blocks": HYPER.blocks,
            "lr": 0.05,
            "momentum": 0.9,
            "l2": 1e-4,
        },
        "repeats": args.repeats,
        "memory_method": "rss: VmHWM growth after clear_refs; saved: distinct storages "
        "saved by autograd (reversible: largest step) + reversible state bytes",
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
