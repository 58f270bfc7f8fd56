"""A task's data as the runner trains on it: three splits as tensors on one device.

`load_task_data(task, options, device)` asks the task's dataset for its `Splits` once per process
(a small cache keyed by the dataset and the options that decide its content), checks them,
splits and standardises them, and puts them on the device:

- **validation**: the data's own `x_val`/`y_val` when they bring them (capped by `data.n_val`),
  else `data.n_val` examples (default `data.val_fraction` of the pool) cut from the training
  pool by a permutation seeded with `data.split_seed`; so the objective never sees a test
  example and every trial of a study sees the same three splits. `data.n_train` and
  `data.n_test` cap the training and test splits.
- **inputs** are standardised with the training split's statistics (one mean and standard
  deviation for vectors, one per channel for images) and flattened on the device for models
  that take vectors (`Model.inputs`);
- **targets**: integer labels (classification), or floats shaped `(N, d)` (regression; a
  one-dimensional target becomes `(N, 1)`, matching a model's `[B, 1]` outputs). They are not
  standardised: the loss is reported in the data's own units.

Whatever the dataset (built-in, a plugin's, a file), the arrays are checked before training:
inputs and targets of equal length per split, inputs of one shape, finite values, labels within
0 … C−1, regression targets that vary. A `torch.utils.data.Dataset` split is read into memory
first (`(input, target)` pairs).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worker.tasks.contract import Splits, Task
from worker.tasks.losses import LOSSES, Loss, loss_of

__all__ = ["TaskData", "check_splits", "load_task_data", "materialise"]


@dataclass(frozen=True)
class TaskData:
    """Train/validation/test splits as tensors on one device, with the task's loss.

    `n_classes` is the number of outputs (classes, or regression values per example);
    `chance_loss` the loss of knowing nothing of the inputs (`worker.tasks.losses`)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    loss: Loss = LOSSES["classification"]
    chance_loss: float = math.nan

    @property
    def n_outputs(self) -> int:
        return self.n_classes


_ARRAYS: OrderedDict[str, Splits] = OrderedDict()
_TENSORS: OrderedDict[str, TaskData] = OrderedDict()
_CACHE_SIZE = 4  # per process; trials of one study share one entry
_SPLIT_KEYS = ("split_seed", "val_fraction", "n_train", "n_val", "n_test")


def _cached(cache: OrderedDict[str, Any], key: str, make: Callable[[], Any]) -> Any:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _array(split: Any, name: str) -> np.ndarray:
    if isinstance(split, torch.Tensor):
        return split.detach().cpu().numpy()
    return np.asarray(split)


def materialise(splits: Splits) -> Splits:
    """Splits with every `torch.utils.data.Dataset` read into arrays."""
    values: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
        if isinstance(x, torch.utils.data.Dataset) and y is None:
            pairs = [x[i] for i in range(len(x))]  # type: ignore[arg-type]
            x = np.stack([_array(p[0], f"x_{split}") for p in pairs]) if pairs else None
            y = np.stack([_array(p[1], f"y_{split}") for p in pairs]) if pairs else None
        values[f"x_{split}"] = None if x is None else _array(x, f"x_{split}")
        values[f"y_{split}"] = None if y is None else _array(y, f"y_{split}")
    return Splits(**values)


def check_splits(splits: Splits, kind: str, n_outputs: int, where: str) -> None:
    """ValueError naming the task and the array for what training cannot use (see the module
    docstring); `n_outputs` is the number of classes, or of values per regression target."""
    names = [s for s in ("train", "val", "test") if getattr(splits, f"x_{s}") is not None]
    if "train" not in names or "test" not in names:
        raise ValueError(f"{where}: the data must have x_train, y_train, x_test and y_test")
    shape = splits.x_train.shape[1:]
    for split in names:
        x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
        if y is None or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{where}: x_{split} and y_{split} differ in length or are empty")
        if x.shape[1:] != shape:
            raise ValueError(f"{where}: x_{split} examples are {x.shape[1:]}, x_train's {shape}")
        if x.dtype.kind not in "biuf" or not np.isfinite(x).all():
            raise ValueError(f"{where}: x_{split} must hold finite numbers")
        if kind == "classification":
            if y.ndim != 1 or y.dtype.kind not in "iu":
                raise ValueError(f"{where}: y_{split} must be one integer label per example")
            if len(y) and (y.min() < 0 or y.max() >= n_outputs):
                raise ValueError(
                    f"{where}: y_{split} holds labels outside 0 to {n_outputs - 1} "
                    f"({int(y.min())} to {int(y.max())})"
                )
        else:
            values = y.reshape(len(y), -1)
            if values.dtype.kind not in "biuf" or not np.isfinite(values).all():
                raise ValueError(f"{where}: y_{split} must hold finite numbers")
            if values.shape[1] != n_outputs:
                raise ValueError(
                    f"{where}: y_{split} has {values.shape[1]} values per example, the task "
                    f"declares {n_outputs}"
                )
    if kind == "regression" and not np.asarray(splits.y_train, np.float64).var(axis=0).mean() > 0:
        raise ValueError(f"{where}: y_train does not vary; a regression needs targets that do")


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    train = train.astype(np.float32, copy=False)
    axes = (0, 2, 3) if train.ndim == 4 else None
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-8
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _targets(y: np.ndarray, kind: str) -> np.ndarray:
    if kind == "classification":
        return y.astype(np.int64, copy=False)
    return y.reshape(len(y), -1).astype(np.float32, copy=False)


def _split(splits: Splits, data: Mapping[str, Any], kind: str) -> tuple[np.ndarray, ...]:
    x_pool, y_pool = splits.x_train, splits.y_train
    n = len(y_pool)
    if splits.x_val is not None:
        x_val, y_val = splits.x_val, splits.y_val
        assert y_val is not None  # check_splits
        if data.get("n_val"):
            x_val, y_val = x_val[: data["n_val"]], y_val[: data["n_val"]]
        order = np.arange(n)
    else:
        n_val = data.get("n_val") or max(1, round(float(data.get("val_fraction", 0.2)) * n))
        if n_val >= n:
            raise ValueError(f"data.n_val: {n_val} leaves no training examples out of {n}")
        order = np.random.default_rng(int(data.get("split_seed", 0))).permutation(n)
        x_val, y_val = x_pool[order[:n_val]], y_pool[order[:n_val]]
        order = order[n_val:]
    if data.get("n_train"):
        order = order[: data["n_train"]]
    n_test = data.get("n_test") or len(splits.y_test)
    x_train, x_val, x_test = _standardise(x_pool[order], x_val, splits.x_test[:n_test])
    return (
        x_train,
        _targets(y_pool[order], kind),
        x_val,
        _targets(y_val, kind),
        x_test,
        _targets(splits.y_test[:n_test], kind),
    )


def _source_key(task: Task, data: Mapping[str, Any]) -> str:
    dataset = task.dataset
    content = (
        dataset.cache_key(data)
        if dataset.cache_key is not None
        else {k: data.get(k) for k in sorted(dataset.options)}
    )
    return json.dumps([task.package, dataset.name, content], default=str)


def load_task_data(
    task: Task | str, data: Mapping[str, Any], device: torch.device | str = "cpu"
) -> TaskData:
    """The task's splits on `device`, flattened for vector models; cached per process. A name
    is looked up in this process's registry."""
    if isinstance(task, str):
        from worker.tasks.registry import get_task

        task = get_task(task)
    shape = task.shape(data)
    flat = task.model.flat(shape.input_shape)
    array_key = _source_key(task, data)
    split = {k: data.get(k) for k in _SPLIT_KEYS}
    tensor_key = json.dumps([array_key, split, flat, str(device)], sort_keys=True, default=str)

    def arrays() -> Splits:
        splits = materialise(task.dataset.load(data))
        check_splits(splits, task.kind, shape.n_outputs, f"task {task.name}")
        return splits

    def make() -> TaskData:
        parts = _split(_cached(_ARRAYS, array_key, arrays), data, task.kind)
        tensors = [torch.from_numpy(np.ascontiguousarray(p)).to(device) for p in parts]
        if flat:
            for i in (0, 2, 4):
                tensors[i] = tensors[i].reshape(len(tensors[i]), -1)
        x_train, y_train, x_val, y_val, x_test, y_test = tensors
        loss = loss_of(task.kind)
        chance = loss.chance_loss(shape.n_outputs, y_train)
        return TaskData(
            x_train, y_train, x_val, y_val, x_test, y_test, shape.n_outputs, loss, chance
        )

    result: TaskData = _cached(_TENSORS, tensor_key, make)
    return result
