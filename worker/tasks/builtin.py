"""ratebench's own tasks, declared through the task contract like any plugin's.

ratebench's `pyproject.toml` declares this module's `tasks` under the entry-point group
`ratebench.tasks` (`builtin = "worker.tasks.builtin:tasks"`), so the registry
(`worker.tasks.registry`) finds them the way it finds a plugin's. A task is `<dataset>-<model>`:
every built-in dataset (`worker.tasks.datasets`, and the files datasets of `worker.tasks.files`)
with every built-in model (`worker.tasks.models`) that can read its inputs: a convolutional
model needs images, so `mnist1d` (vectors) pairs with `mlp` and `resnet` only, while the
datasets whose inputs the data options or files decide (`synthetic`, `files`,
`files-regression`) pair with every model and are checked when a spec names them. `mnist1d-cnn`
is mnist1d's 1-D convolutional network (`models.CNN1D`), which no other dataset takes.
"""

from __future__ import annotations

from worker.tasks.contract import Dataset, Model, Task
from worker.tasks.datasets import DATASETS
from worker.tasks.files import FILE_DATASETS
from worker.tasks.models import CNN1D, MODELS

__all__ = ["tasks"]


def _pairs(dataset: Dataset, model: Model) -> bool:
    if model.inputs != "image" or callable(dataset.shape):  # callable: the data decide
        return True
    return len(dataset.shape.input_shape) == 3


def tasks() -> list[Task]:
    """Every built-in task (the entry point's object)."""
    found = [
        Task(f"{d.name}-{m.name}", d, m)
        for d in (*DATASETS.values(), *FILE_DATASETS.values())
        for m in MODELS.values()
        if _pairs(d, m)
    ]
    found.append(Task("mnist1d-cnn", DATASETS["mnist1d"], CNN1D))
    return found
