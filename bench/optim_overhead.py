"""Training-step overhead of the layer-wise schemes relative to torch's SGD.

Times a full training step (zero_grad, forward, loss, backward, optimizer step) for `sgd`,
`adam`, `lars`, `lamb` and `bmp` on two models — an MLP of the mnist1d shape (40 inputs,
10 classes) and a VGG13 with BatchNorm (width-scalable) on CIFAR-shaped synthetic batches —
and prints JSON: the machine, the versions, and per model and scheme the median time per step
and the median over rounds of (scheme time / sgd time in the same round), both in wall-clock
time and in the process's CPU time (which a busy machine disturbs less: time spent waiting
for a core is not counted). Schemes are interleaved within each round (rotating the order),
each on its own copy of the same network.

    python bench/optim_overhead.py                    # defaults: about 1–2 minutes on 2 cores
    python bench/optim_overhead.py --device cuda --vgg-width 1 --vgg-batch 128
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import optim

SCHEMES = ("sgd", "adam", "lars", "lamb", "bmp")
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.9},
    "adam": {"lr": 1e-4},
    "lars": {"lr": 1e-2},
    "lamb": {"lr": 1e-4},
    "bmp": {"lr": 1e-3, "momentum": 0.9, "propagate": True, "mean_over_positions": False},
}
VGG13 = (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")  # × 64·width channels


def mlp(hidden: int) -> nn.Module:
    """The mnist1d MLP shape: 40 → hidden → hidden → 10 with ReLU."""
    return nn.Sequential(
        nn.Linear(40, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def vgg13_bn(width: float) -> nn.Module:
    """VGG13 with BatchNorm for 32×32×3 inputs; channels 64·width … 512·width."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG13:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, round(64 * width * int(item)))
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, 10))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    schemes: tuple[str, ...],
    rounds: int,
    steps: int,
) -> dict[str, dict[str, float]]:
    """Median step time per scheme and median per-round ratio to sgd."""
    device = x.device
    runs: dict[str, Callable[[], None]] = {}
    for name in schemes:
        net = copy.deepcopy(model)
        opt = optim.build(name, net, **HYPERPARAMETERS[name])

        def step(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()

        runs[name] = step
    for run in runs.values():
        for _ in range(max(3, steps // 2)):
            run()
    wall: dict[str, list[float]] = {name: [] for name in schemes}
    cpu: dict[str, list[float]] = {name: [] for name in schemes}
    for r in range(rounds):
        order = schemes[r % len(schemes) :] + schemes[: r % len(schemes)]
        for name in order:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                runs[name]()
            _sync(device)
            wall[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.process_time() - start_cpu) / steps)
    result = {}
    for name in schemes:
        result[name] = {
            "step_ms": round(statistics.median(wall[name]) * 1e3, 4),
            "ratio_to_sgd": _median_ratio(wall[name], wall["sgd"]),
            "cpu_step_ms": round(statistics.median(cpu[name]) * 1e3, 4),
            "cpu_ratio_to_sgd": _median_ratio(cpu[name], cpu["sgd"]),
        }
    return result


def _median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round."""
    return round(statistics.median(t / s for t, s in zip(times, reference, strict=True)), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--mlp-hidden", type=int, default=100)
    parser.add_argument("--mlp-batch", type=int, default=128)
    parser.add_argument("--mlp-steps", type=int, default=100)
    parser.add_argument("--vgg-width", type=float, default=0.25)
    parser.add_argument("--vgg-batch", type=int, default=32)
    parser.add_argument("--vgg-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cases = {
        "mlp_mnist1d": (
            mlp(args.mlp_hidden),
            torch.randn(args.mlp_batch, 40),
            args.mlp_batch,
            args.mlp_steps,
        ),
        "vgg13_bn_cifar": (
            vgg13_bn(args.vgg_width),
            torch.randn(args.vgg_batch, 3, 32, 32),
            args.vgg_batch,
            args.vgg_steps,
        ),
    }
    results = {}
    for name, (model, x, batch, steps) in cases.items():
        y = torch.randint(0, 10, (batch,))
        model = model.to(device)
        results[name] = measure(model, x.to(device), y.to(device), SCHEMES, args.rounds, steps)
    report = {
        "benchmark": "optim_overhead",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "ratebench": metadata.version("ratebench"),
        },
        "config": {
            "mlp": f"40-{args.mlp_hidden}-{args.mlp_hidden}-10 ReLU, batch {args.mlp_batch}",
            "vgg": f"VGG13-BN width {args.vgg_width}, batch {args.vgg_batch}, 32x32x3",
            "rounds": args.rounds,
            "steps_per_round": {"mlp": args.mlp_steps, "vgg": args.vgg_steps},
            "hyperparameters": HYPERPARAMETERS,
        },
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
