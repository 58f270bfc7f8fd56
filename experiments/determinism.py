"""What makes a trial's numbers differ: the same trial under each setting PyTorch's CPU kernels
depend on, compared bit for bit.

One trial per arm of `examples/quick.json` (mnist1d MLP 2×128, batch 100, 15 epochs, seed 1) at
the best rates its README table shows, each run in a fresh process per variant. A variant
changes one thing: the number of threads, the SIMD level of ATen's own kernels
(`ATEN_CPU_CAPABILITY`), MKL's instruction set (`MKL_ENABLE_INSTRUCTIONS`), oneDNN's
(`ONEDNN_MAX_CPU_ISA`), or all three at AVX2 (what a CPU without AVX-512 runs). The baseline
runs twice. For each variant: whether every epoch's train loss, validation loss and accuracy
equal the baseline's exactly, the largest difference in the final validation accuracy, and the
first epoch that differs.

    python experiments/determinism.py --out docs/figures/determinism.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS = {  # quick.json's arms at README's best rates
    "sgd": ("sgd", {"lr": 0.158, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.00829}),
    # bmp as quick.json trained it when this was measured: the paper's form (since revision 3
    # the default is local with means over positions; on this MLP only `propagate` matters)
    "bmp": (
        "bmp",
        {"lr": 0.0362, "momentum": 0.9, "propagate": True, "mean_over_positions": False},
    ),
}
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
VARIANTS: dict[str, tuple[int, dict[str, str]]] = {
    "baseline (1 thread)": (1, {}),
    "baseline again": (1, {}),
    "2 threads": (2, {}),
    "ATen kernels at AVX2": (1, {"ATEN_CPU_CAPABILITY": "avx2"}),
    "ATen kernels without SIMD": (1, {"ATEN_CPU_CAPABILITY": "default"}),
    "MKL at AVX2": (1, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    "oneDNN at AVX2": (1, {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "all three at AVX2": (1, AVX2),
}

_CHILD = """
import json, sys
import torch
from worker.runner import TrialConfig, run_trial
threads, arms = int(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(threads)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
for name, (scheme, hp) in arms.items():
    config = TrialConfig(task="mnist1d-mlp", scheme=scheme, hyperparameters=hp, epochs=15,
                         data={"batch_size": 100}, model={"width": 128, "depth": 2}, seed=1,
                         device="cpu")
    result = run_trial(config)
    out[name] = [[r.train_loss, r.val_loss, r.val_accuracy] for r in result.history]
print(json.dumps(out))
"""


def run_variant(threads: int, env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads), json.dumps(ARMS)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
        check=True, timeout=1800,
    )  # fmt: skip
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def compare(base: list[list[float]], other: list[list[float]]) -> dict[str, Any]:
    pairs = enumerate(zip(base, other, strict=False))
    first = next((i + 1 for i, (a, b) in pairs if a != b), None)
    if first is None and len(base) != len(other):  # one diverged earlier than the other
        first = min(len(base), len(other)) + 1
    return {
        "identical": first is None,
        "first_epoch_that_differs": first,
        "final_val_accuracy": other[-1][2],
        "final_val_accuracy_difference": abs(other[-1][2] - base[-1][2]),
        "largest_train_loss_difference": max(
            abs(a[0] - b[0]) for a, b in zip(base, other, strict=False)
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = {name: run_variant(threads, env) for name, (threads, env) in VARIANTS.items()}
    base = runs["baseline (1 thread)"]
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu(), "python": platform.python_version()},
        "variants": {},
    }
    for name, run in runs.items():
        report["variants"][name] = {
            "threads": run["threads"],
            "aten_capability": run["capability"],
            "env": VARIANTS[name][1],
            "arms": {arm: compare(base[arm], run[arm]) for arm in ARMS},
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
