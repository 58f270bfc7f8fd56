"""Training throughput of `worker.runner.run_trial` vs a minimal hand-written PyTorch loop.

Both train the same model (`worker.tasks.build_model`, same seed) on the same tensors (already
on the device) with the same optimizer (`torch.optim.SGD`, which `optim.build("sgd")` returns)
for the same number of full batches, and both evaluate the validation split after every epoch.
Each is timed from the call to its return (data loading excluded: both use the process's
cached tensors). Examples per second = training examples / seconds. Runs are interleaved
(reference and runner alternate, the order flipping every repeat) and the medians reported.

Usage: python bench/runner_throughput.py [--presets mnist1d-mlp synthetic-cnn] [--epochs 10]
[--repeats 9] [--device auto]
Prints one JSON object and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from worker.runner import TrialConfig, resolve_device, run_trial
from worker.tasks import build_model, get_task, load_task_data


def reference_loop(config: TrialConfig) -> float:
    """The loop a person would write by hand; returns training examples per second."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    options = config.data.model_dump()
    data = load_task_data(config.task, options, device)
    task = get_task(config.task)
    batch = config.data.batch_size
    torch.manual_seed(config.seed)
    model = build_model(
        task.model.name,
        task.input_shape(options),
        data.n_classes,
        width=config.model.width,
        depth=config.model.depth,
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.hyperparameters["lr"])
    generator = torch.Generator().manual_seed(config.seed)
    n = len(data.y_train)
    steps = n // batch
    for _epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(steps):
            index = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(data.x_val)
            F.cross_entropy(logits, data.y_val).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return config.epochs * steps * batch / (time.perf_counter() - started)


def runner(config: TrialConfig) -> float:
    started = time.perf_counter()
    result = run_trial(config)
    if result.device.startswith("cuda"):
        torch.cuda.synchronize()
    return result.steps * config.data.batch_size / (time.perf_counter() - started)


PRESETS: dict[str, dict[str, Any]] = {
    "mnist1d-mlp": {
        "task": "mnist1d-mlp",
        "data": {"batch_size": 128, "n_val": 512},
        "model": {"width": 256, "depth": 2},
    },
    "synthetic-cnn": {
        "task": "synthetic-cnn",
        "data": {"batch_size": 128, "n_val": 256, "input_shape": [3, 32, 32], "n_examples": 2560},
        "model": {"width": 16, "depth": 2},
    },
}


def measure(config: TrialConfig, repeats: int) -> dict[str, Any]:
    reference_loop(config)  # warm-up: data generation and caches, first-call overheads
    runner(config)
    ours: list[float] = []
    theirs: list[float] = []
    for repeat in range(repeats):
        pair = (reference_loop, runner) if repeat % 2 == 0 else (runner, reference_loop)
        for fn in pair:
            (theirs if fn is reference_loop else ours).append(fn(config))
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "task": config.task,
        "data": config.data,
        "model": config.model,
        "epochs": config.epochs,
        "runner_examples_per_sec_median": round(statistics.median(ours), 1),
        "reference_examples_per_sec_median": round(statistics.median(theirs), 1),
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(theirs), 4),
        "ratio_median_of_pairs": round(statistics.median(ratios), 4),
        "ratios": [round(r, 4) for r in ratios],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    results = [
        measure(
            TrialConfig(
                scheme="sgd",
                hyperparameters={"lr": 0.05},
                epochs=args.epochs,
                device=args.device,
                **PRESETS[name],
            ),
            args.repeats,
        )
        for name in args.presets
    ]
    report: dict[str, Any] = {
        "benchmark": "runner_throughput",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "repeats": args.repeats,
        "target_ratio": 0.95,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
