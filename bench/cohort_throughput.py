"""Training throughput of a cohort (K trials as one batched model) vs the same K trials one by one.

For each K, scheme and thread count, a round trains K configs of one task and scheme that
differ only in their learning rate, once with `worker.cohort.run_cohort` and once as K
sequential `worker.runner.run_trial` calls (the order of the two flips every round; with several
`--scheme`s each round measures them one after another, so they see the same machine load).
Both train `--steps` full batches in one epoch; throughput counts training only (each epoch's
`examples_per_sec`, which excludes evaluation and set-up), so the ratio compares training loops:

    cohort examples/s        = K · (examples/s of each member)
    sequential examples/s    = K trials' examples / the sum of their training times
    ratio (per round)        = cohort examples/s / sequential examples/s

Reported per (threads, scheme, K): medians over rounds of each figure, and the median of the
per-round ratios. `--device cuda` runs both on the GPU (the runner's epoch-end `.item()`
synchronises, so the times are complete); `--threads` then only sets the host's intra-op threads.

Usage: python bench/cohort_throughput.py [--task mnist1d-mlp] [--scheme sgd bmp] [--ks 1 4 16 64]
[--threads 1 2] [--device cpu] [--rounds 5] [--steps 40] [--batch-size 128] [--out FILE]
Prints a table and one JSON object (also written to --out) and exits 0. `--profile` instead
profiles `--rounds` cohorts of each scheme and K (cProfile, by cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from worker.cohort import run_cohort
from worker.runner import TrialConfig, run_trial
from worker.spec import DataOptions


def _configs(args: argparse.Namespace, scheme: str, k: int) -> list[TrialConfig]:
    base = TrialConfig(
        task=args.task,
        scheme=scheme,
        hyperparameters={},
        epochs=1,
        steps_per_epoch=args.steps,
        data=DataOptions(batch_size=args.batch_size),
        device=args.device,
    )
    lrs = [args.lr * 2 ** (i / max(1, k - 1) * 2 - 1) for i in range(k)]  # lr/2 .. 2·lr
    return [replace(base, hyperparameters={"lr": lr}) for lr in lrs]


def _cohort(configs: list[TrialConfig]) -> float:
    """Cohort examples per second, all members together."""
    results = run_cohort(configs)
    return sum(r.history[0].examples_per_sec for r in results)


def _sequential(configs: list[TrialConfig]) -> float:
    """Examples per second of the K trials run one after another."""
    examples = configs[0].steps_per_epoch * configs[0].data.batch_size  # type: ignore[operator]
    seconds = sum(examples / run_trial(c).history[0].examples_per_sec for c in configs)
    return len(configs) * examples / seconds


def measure(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    for scheme in args.scheme:  # warm-up: data loading, first-call costs
        _cohort(_configs(args, scheme, 2))
        _sequential(_configs(args, scheme, 1))
    rows: dict[tuple[str, int], dict[str, list[float]]] = {
        (s, k): {"cohort": [], "sequential": [], "ratio": []} for s in args.scheme for k in args.ks
    }
    for round_ in range(args.rounds):
        for k in args.ks:
            for scheme in args.scheme:
                configs = _configs(args, scheme, k)
                if round_ % 2 == 0:
                    cohort, sequential = _cohort(configs), _sequential(configs)
                else:
                    sequential, cohort = _sequential(configs), _cohort(configs)
                rows[scheme, k]["cohort"].append(cohort)
                rows[scheme, k]["sequential"].append(sequential)
                rows[scheme, k]["ratio"].append(cohort / sequential)
    return [
        {
            "threads": threads,
            "scheme": scheme,
            "K": k,
            "cohort_examples_per_s": round(statistics.median(r["cohort"])),
            "cohort_examples_per_s_per_member": round(statistics.median(r["cohort"]) / k),
            "sequential_examples_per_s": round(statistics.median(r["sequential"])),
            "ratio_median": round(statistics.median(r["ratio"]), 2),
            "ratio_min": round(min(r["ratio"]), 2),
            "ratio_max": round(max(r["ratio"]), 2),
            "ratios": [round(v, 2) for v in r["ratio"]],  # per round, in order
        }
        for (scheme, k), r in rows.items()
    ]


def profile(args: argparse.Namespace) -> None:
    """`--profile`: where a cohort's time goes. For each scheme, K and thread count, one warm-up
    cohort, then `--rounds` cohorts under cProfile; prints the functions by cumulative time."""
    for threads in args.threads:
        torch.set_num_threads(threads)
        for scheme in args.scheme:
            for k in args.ks:
                configs = _configs(args, scheme, k)
                run_cohort(configs)
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.rounds):
                    run_cohort(configs)
                profiler.disable()
                print(f"== {scheme}, K = {k}, {threads} threads, {args.rounds} cohorts")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--scheme", nargs="+", default=["sgd"], help="one or more schemes")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="profile cohorts, measure nothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.profile:
        profile(args)
        return 0
    started, load_at_start = time.perf_counter(), list(os.getloadavg())
    rows = [row for threads in args.threads for row in measure(args, threads)]
    report = {
        "benchmark": "cohort_throughput",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(
        f"{'threads':>7} {'scheme':>9} {'K':>3} {'cohort ex/s':>12} {'per member':>11} "
        f"{'sequential':>11} ratio"
    )
    for r in rows:
        print(
            f"{r['threads']:>7} {r['scheme']:>9} {r['K']:>3} {r['cohort_examples_per_s']:>12} "
            f"{r['cohort_examples_per_s_per_member']:>11} {r['sequential_examples_per_s']:>11} "
            f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
