"""Tasks: datasets × models with their loss and metrics, behind one contract.

A task knows nothing about optimizers (the workload/algorithm split of AlgoPerf,
mlcommons/algorithmic-efficiency `algoperf/spec.py`): it yields data splits and builds a model,
and says which loss trains it; the runner brings the scheme. The contract is
`worker.tasks.contract` (`Task`, `Dataset`, `Model`, `Option`, `Splits`, `DataShape`); the
losses and metrics of each kind are `worker.tasks.losses`. Every task, ratebench's own
(`worker.tasks.builtin`: mnist1d, digits, CIFAR, synthetic and files data × MLP, CNN, VGG,
ResNet) and a plugin's, is found through the entry-point group `ratebench.tasks`
(`worker.tasks.registry`), once per process. `load_task_data` (`worker.tasks.data`) turns a
task's data into the tensors a trial trains on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.tasks._paths import DataPathError, DataRoots, public_paths, redact_paths
from worker.tasks.contract import (
    Dataset,
    DataShape,
    Model,
    Option,
    Splits,
    Task,
    TaskMismatchError,
    UnknownTaskError,
)
from worker.tasks.data import TaskData, load_task_data
from worker.tasks.datasets import DATASETS
from worker.tasks.models import MODELS, build_model, count_parameters
from worker.tasks.registry import (
    ENTRY_POINT_GROUP,
    describe_tasks,
    get_task,
    register,
    require,
    tasks,
)

__all__ = [
    "DATASETS",
    "ENTRY_POINT_GROUP",
    "MODELS",
    "DataPathError",
    "DataRoots",
    "DataShape",
    "Dataset",
    "Model",
    "Option",
    "Splits",
    "Task",
    "TaskData",
    "TaskMismatchError",
    "UnknownTaskError",
    "build_model",
    "check_data_source",
    "count_parameters",
    "describe_tasks",
    "get_task",
    "load_task_data",
    "public_paths",
    "redact_paths",
    "register",
    "require",
    "tasks",
]


def check_data_source(
    task: str, data: Mapping[str, Any] | str | None, roots: DataRoots
) -> str | None:
    """Why `task` cannot read its data under `roots`, as a message for `data.data_dir`, or
    None: the dataset's own check (a CIFAR folder's files; a files dataset's every array),
    run when a study is submitted. `data` is the spec's data options (or only its data_dir)."""
    options = {"data_dir": data} if data is None or isinstance(data, str) else data
    check = get_task(task).dataset.check
    return None if check is None else check(options, roots)
