"""How long a submit's validation takes (`service.api.studies.admit`: the spec, its model builds
on the meta device, its data folder, budget and step estimate), for the specs that cost most.

`POST /api/v1/studies` bounds this work per request (`RATEBENCH_MAX_VALIDATION_S`, default
30 s) and runs it in two threads of its own; this program measures where a spec stands against
that bound, in a fresh process (the first validation of a process imports the checks and loads
PyTorch's meta kernels) and then again (models already built are cached per process).

    python bench/submit_validation.py --rounds 3 --out docs/bench/submit_validation.json

`cold` includes what a process does once (imports of the checks and of PyTorch's optimizer
machinery, its first meta-device kernels); a service does that before its first submit
(`worker.spec.warm_up_checks`, `worker.footprint.warm_up`).

Cases: `examples/quick.json`; `examples/cifar10-vgg-bn.json`; and the largest spec the limits
allow to build: 16 arms on a synthetic VGG at 256×256, each arm its own width (no two arms
share a model, so nothing is cached between them). `cifar10-vgg-bn` is refused at
`data.data_dir` where the CIFAR-10 files are absent, after every other check has run.
Prints one JSON document: per case the median and each round's seconds, cold (a new process
per round) and warm (the same spec again in that process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_ONE = """
import json, sys, time
t0 = time.perf_counter()
from service.api.studies import admit
from service.config import Settings
imported = time.perf_counter() - t0
spec = json.loads(sys.argv[1])
settings = Settings(data_dir=sys.argv[2], max_validation_s=600)
times = []
for _ in range(2):
    t = time.perf_counter()
    try:
        admit(spec, settings)
        outcome = "admitted"
    except Exception as exc:  # a 422: the fields it names
        errors = getattr(exc, "errors", lambda: [])()
        outcome = "refused at " + ", ".join(".".join(map(str, e["loc"][1:])) for e in errors)
    times.append(time.perf_counter() - t)
result = {"import_s": imported, "cold_s": times[0], "warm_s": times[1], "outcome": outcome}
print(json.dumps(result))
"""


def _cases() -> dict[str, dict[str, Any]]:
    examples = ROOT / "examples"
    widest = {
        "name": "widest",
        "task": "synthetic-vgg",
        "data": {"input_shape": [3, 256, 256], "n_examples": 100, "batch_size": 8},
        "model": {"width": 4},
        "arms": [
            {"optimizer": "sgd", "label": f"a{i}", "model": {"width": 4 + i}} for i in range(16)
        ],
        "budget": {"trials_per_arm": 1, "epochs": 1, "final_seeds": 1},
    }
    return {
        "quick": json.loads((examples / "quick.json").read_text()),
        "cifar10-vgg-bn": json.loads((examples / "cifar10-vgg-bn.json").read_text()),
        "16-arms-distinct-vgg": widest,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    load_before = os.getloadavg()
    for name, spec in _cases().items():
        rounds = []
        for _ in range(args.rounds):
            out = subprocess.run(
                [sys.executable, "-c", _ONE, json.dumps(spec), str(ROOT / "data")],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[name] = {
            "outcome": rounds[0]["outcome"],
            "cold_s_median": statistics.median(r["cold_s"] for r in rounds),
            "warm_s_median": statistics.median(r["warm_s"] for r in rounds),
            "rounds": rounds,
        }
    import torch

    document = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": results,
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
