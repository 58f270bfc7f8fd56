"""The task registry: a task is a dataset × a model, named `<dataset>-<model>` (`mnist1d-mlp`).

A task knows nothing about optimizers (the workload/algorithm split of AlgoPerf,
mlcommons/algorithmic-efficiency `algoperf/spec.py`): it yields data splits on a device and
builds a model; the runner brings the scheme. Convolutional models need image datasets, so
`mnist1d` (vectors) pairs with `mlp` and `resnet` only; `synthetic` pairs with every model and
its `data.input_shape` decides (three dimensions make images).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.tasks._paths import DataPathError, DataRoots, redact_paths
from worker.tasks.datasets import (
    DATASETS,
    Arrays,
    DatasetInfo,
    cifar_folder,
    load_arrays,
    locate_cifar,
)
from worker.tasks.models import CNN1D, MODELS, ModelInfo, build_model, count_parameters

__all__ = [
    "DATASETS",
    "MODELS",
    "TASKS",
    "DataPathError",
    "DataRoots",
    "DatasetInfo",
    "ModelInfo",
    "TaskData",
    "TaskInfo",
    "build_model",
    "check_data_source",
    "count_parameters",
    "describe_tasks",
    "get_task",
    "load_task_data",
    "redact_paths",
]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    dataset: DatasetInfo
    model: ModelInfo

    def input_shape(self, data: dict[str, Any]) -> tuple[int, ...]:
        return self.dataset.input_shape(data)

    def n_classes(self, data: dict[str, Any]) -> int:
        return self.dataset.n_classes(data)

    def flat_input(self, data: dict[str, Any]) -> bool:
        """Whether the model takes flattened vectors (MLPs, vector ResNets)."""
        return self.model.name == "mlp" or len(self.input_shape(data)) != 3


TASKS: dict[str, TaskInfo] = {
    f"{d.name}-{m.name}": TaskInfo(f"{d.name}-{m.name}", d, m)
    for d in DATASETS.values()
    for m in MODELS.values()
    if d.image or not m.needs_image or d.name == "synthetic"
}
# mnist1d's convolutional task: a 1-D network (models.CNN1D) that no other dataset takes
TASKS["mnist1d-cnn"] = TaskInfo("mnist1d-cnn", DATASETS["mnist1d"], CNN1D)


def get_task(name: str) -> TaskInfo:
    """The task called `name`, or a ValueError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def check_data_source(task: str, data_dir: str | None, roots: DataRoots) -> str | None:
    """Why `task` cannot read its data, as a message for `data.data_dir`, or None: for the
    local-file datasets, a path outside `roots` or missing files (checked when a study is
    submitted; nothing else is read then)."""
    dataset = get_task(task).dataset.name
    if dataset not in ("cifar10", "cifar100"):
        return None
    try:
        locate_cifar(dataset, data_dir, roots)
    except (DataPathError, FileNotFoundError) as exc:
        return str(exc)
    return None


def describe_tasks() -> list[dict[str, Any]]:
    """Every task with its dataset, model, default input shape and model defaults (for clients
    building a spec; `GET /api/v1/tasks`)."""
    return [
        {
            "name": t.name,
            "dataset": t.dataset.name,
            "model": t.model.name,
            "description": f"{t.dataset.description}; {t.model.description}",
            "input_shape": list(t.input_shape({})),
            "n_classes": t.n_classes({}),
            "default_width": t.model.default_width,
            "default_depth": t.model.default_depth,
            "transformed": t.model.name == "mlp",
        }
        for t in TASKS.values()
    ]


@dataclass(frozen=True)
class TaskData:
    """Train/validation/test splits as tensors on one device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int


_ARRAYS: OrderedDict[str, Arrays] = OrderedDict()
_TENSORS: OrderedDict[str, TaskData] = OrderedDict()
_CACHE_SIZE = 4  # per process; trials of one study share one entry


def _cached(cache: OrderedDict[str, Any], key: str, make: Any) -> Any:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


_SOURCE_KEYS = ("data_dir", "input_shape", "n_classes", "n_examples")
_SPLIT_KEYS = ("split_seed", "val_fraction", "n_train", "n_val", "n_test")


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    axes = (0, 2, 3) if train.ndim == 4 else None
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-8
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _split(arrays: Arrays, data: dict[str, Any]) -> tuple[np.ndarray, ...]:
    n = len(arrays.y_train)
    n_val = data.get("n_val") or max(1, round(float(data.get("val_fraction", 0.2)) * n))
    if n_val >= n:
        raise ValueError(f"data.n_val: {n_val} leaves no training examples out of {n}")
    order = np.random.default_rng(int(data.get("split_seed", 0))).permutation(n)
    val, train = order[:n_val], order[n_val:]
    if data.get("n_train"):
        train = train[: data["n_train"]]
    n_test = data.get("n_test") or len(arrays.y_test)
    x_train, x_val, x_test = _standardise(
        arrays.x_train[train], arrays.x_train[val], arrays.x_test[:n_test]
    )
    return (
        x_train,
        arrays.y_train[train],
        x_val,
        arrays.y_train[val],
        x_test,
        arrays.y_test[:n_test],
    )


def load_task_data(task: str, data: dict[str, Any], device: torch.device | str = "cpu") -> TaskData:
    """The task's splits on `device`, flattened for vector models; cached per process."""
    info = get_task(task)
    source = {k: data.get(k) for k in _SOURCE_KEYS}
    keyed = dict(source)
    if info.dataset.name.startswith("cifar"):  # the folder the loader will read, for the key;
        keyed["data_dir"] = str(cifar_folder(info.dataset.name, data))  # checked on every call
    split = {k: data.get(k) for k in _SPLIT_KEYS}
    flat = info.flat_input(data)
    array_key = json.dumps([info.dataset.name, keyed], sort_keys=True, default=str)
    tensor_key = json.dumps([array_key, split, flat, str(device)], sort_keys=True, default=str)

    def make() -> TaskData:
        arrays = _cached(_ARRAYS, array_key, lambda: load_arrays(info.dataset.name, source))
        parts = _split(arrays, data)
        tensors = [torch.from_numpy(np.ascontiguousarray(p)).to(device) for p in parts]
        if flat:
            for i in (0, 2, 4):
                tensors[i] = tensors[i].reshape(len(tensors[i]), -1)
        x_train, y_train, x_val, y_val, x_test, y_test = tensors
        return TaskData(x_train, y_train, x_val, y_val, x_test, y_test, info.n_classes(data))

    result: TaskData = _cached(_TENSORS, tensor_key, make)
    return result
