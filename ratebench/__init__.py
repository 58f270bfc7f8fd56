"""ratebench for notebooks, scripts and plugin packages.

- `compare(model=…, data=…, arms=[…], …)`: ratebench's answer for your own network and data,
  from Python. It runs the same sweep and final seeds as a spec, on a local Ray runtime or the
  cluster at `address=`, and records the study in the same database as the service (source
  "python"), so the web pages, the leaderboards, the exports and optuna-dashboard show it. Your
  callables run on your own machine or cluster, shipped by Ray; the REST service never accepts
  code (`ratebench._compare`).
- The task contract (`Task`, `Dataset`, `Model`, `Option`, `Splits`, `DataShape`), for a
  package that provides tasks through the entry-point group `ratebench.tasks`
  (`worker.tasks.contract`, `worker.tasks.registry`).
"""

from __future__ import annotations

from ratebench._compare import Comparison, compare
from worker.tasks.contract import Dataset, DataShape, Model, Option, Splits, Task

__all__ = ["Comparison", "DataShape", "Dataset", "Model", "Option", "Splits", "Task", "compare"]
