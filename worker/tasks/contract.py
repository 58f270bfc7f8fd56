"""The task contract: what every task provides, the built-in ones and the plugins' alike.

A *task* is data × a model × a loss with its metrics, and a version, in the spirit of AlgoPerf's
`Workload` (mlcommons/algorithmic-efficiency `algoperf/spec.py`): it knows nothing about
optimizers, and the runner brings the scheme. A package provides tasks by declaring an entry
point in the group `ratebench.tasks` (`worker.tasks.registry`) whose object is a `Task`, or a
callable with no arguments returning an iterable of them. ratebench's own tasks are declared
the same way (`worker.tasks.builtin`).

- **Data** (`Dataset`): `load(options)` returns the `Splits` (numpy arrays, or
  `torch.utils.data.Dataset`s, read once into memory): a training pool and a test set, and
  optionally the data's own validation split. Without one, the validation split is cut from the
  training pool by `data.split_seed` and `data.val_fraction`, so the objective never sees a test
  example and every trial of a study sees the same three splits (`worker.tasks.data`). Inputs
  are standardised with the training split's statistics. `shape(options)` says, without reading
  the data, what the spec checks need: the input shape, the outputs, the training pool's size.
  `options` names the data options beyond batching and splitting that the dataset takes
  (`data_dir`, `input_shape`, `n_classes`, `n_examples`); any other is refused at submission.
- **Model** (`Model`): `build(input_shape, n_outputs, **options)` returns an `nn.Module` mapping
  a batch of inputs to `n_outputs` values per example (class logits, or regression outputs). Its
  `options` are typed (`Option`: type, default, bounds or choices); a spec's `model` object is
  checked against them at submission, and the builder gets every declared option, defaults
  filled in. `inputs` says what the model takes: `"flat"` vectors (the data are flattened
  once, on the device), `"image"` (C, H, W), `"any"` (images stay images, anything else is
  flattened), or `"as_given"` (each example exactly as the data hold it).
  A model that is a plain ReLU MLP may say so with `layer_sizes` (the hypergradient tuner trains
  exactly that network). Models are sized and probed on PyTorch's meta device at submission, so
  a builder must work there (nothing is allocated).
- **Loss and metrics** (`kind`): `"classification"` trains the cross-entropy of integer labels
  and reports `val_loss` and `val_accuracy`; `"regression"` trains the mean squared error of
  float targets and reports `val_loss` (that error, to minimise). `worker.tasks.losses`.
- **Version**: a task's version is its own `version`, else its package's (the distribution that
  declares the entry point). A trial names both, and a worker with another version, or without
  the package, refuses to train (`TaskMismatchError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from worker.tasks._paths import DataRoots

__all__ = [
    "DATA_OPTIONS",
    "DataShape",
    "Dataset",
    "Kind",
    "Model",
    "Option",
    "Splits",
    "Task",
    "TaskMismatchError",
    "UnknownTaskError",
]

Kind = Literal["classification", "regression"]
# The data options a dataset may take besides batching and splitting (`worker.spec.DataOptions`).
DATA_OPTIONS = frozenset({"data_dir", "input_shape", "n_classes", "n_examples"})


@dataclass(frozen=True)
class Option:
    """A typed model option: its default and its bounds (`low`, `high`) or `choices`.

    `default` None means the builder chooses (e.g. a width that depends on the input)."""

    name: str
    type: Literal["int", "float", "bool", "str"]
    default: bool | int | float | str | None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    description: str = ""

    def check(self, value: Any) -> str | None:
        """Why `value` is not valid for this option, or None; the caller names the field."""
        if value is None:
            return None
        if self.type == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.type == "str":
            if not isinstance(value, str):
                return f"must be a string, got {value!r}"
            if self.choices is not None and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {value!r}"
        if self.type == "int" and not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value!r}"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low:g}, got {value:g}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}, got {value:g}"
        return None

    def describe(self) -> dict[str, Any]:
        """JSON for clients: name, type, default, bounds or choices, description."""
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "low": self.low,
            "high": self.high,
            "choices": list(self.choices) if self.choices is not None else None,
            "description": self.description,
        }


@dataclass(frozen=True)
class DataShape:
    """What the spec checks know of a task's data without reading it.

    `n_outputs` is the number of classes (classification) or of target values per example
    (regression); `train_pool` the examples the training split and, when the data bring none,
    the validation split are cut from; `own_validation` whether the data bring their own."""

    input_shape: tuple[int, ...]
    n_outputs: int
    train_pool: int
    own_validation: bool = False


@dataclass(frozen=True)
class Splits:
    """A dataset's arrays: inputs `x_*` (float), targets `y_*` (integer labels for
    classification; floats, one value or a row per example, for regression). A split may also be
    a `torch.utils.data.Dataset` of `(input, target)` pairs."""

    x_train: np.ndarray | Any
    y_train: np.ndarray | Any
    x_test: np.ndarray | Any
    y_test: np.ndarray | Any
    x_val: np.ndarray | Any | None = None
    y_val: np.ndarray | Any | None = None


ShapeOf = Callable[[Mapping[str, Any]], DataShape]


@dataclass(frozen=True)
class Dataset:
    """The data side of a task (see the module docstring).

    `load(options)` returns the `Splits`; `shape` is a `DataShape`, or a function of the data
    options when they decide it. `limits(options)` lists `(option, message)` for data options
    this dataset refuses (checked with the spec). `check(options, roots)` may say why the data
    cannot be read (a path outside the data roots, a malformed file), as a message for
    `data.data_dir`: it runs at submission with the service's data roots, and may read files.
    `cache_key(options)` tells apart what the per-process cache holds (default: the options
    the dataset takes)."""

    name: str
    description: str
    kind: Kind
    load: Callable[[Mapping[str, Any]], Splits]
    shape: DataShape | ShapeOf
    options: frozenset[str] = frozenset()
    limits: Callable[[Mapping[str, Any]], list[tuple[str, str]]] | None = None
    check: Callable[[Mapping[str, Any], DataRoots], str | None] | None = None
    cache_key: Callable[[Mapping[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.options) - DATA_OPTIONS
        if unknown:
            raise ValueError(
                f"dataset {self.name!r}: unknown data options {sorted(unknown)}; "
                f"known: {', '.join(sorted(DATA_OPTIONS))}"
            )

    def shape_of(self, options: Mapping[str, Any]) -> DataShape:
        return self.shape(options) if callable(self.shape) else self.shape


@dataclass(frozen=True)
class Model:
    """The model side of a task (see the module docstring)."""

    name: str
    description: str
    build: Callable[..., nn.Module]
    options: tuple[Option, ...] = ()
    inputs: Literal["flat", "image", "any", "as_given"] = "any"
    layer_sizes: Callable[..., list[int] | None] | None = None

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def flat(self, input_shape: tuple[int, ...]) -> bool:
        """Whether the model takes flattened vectors for inputs of `input_shape`."""
        if self.inputs == "flat":
            return True
        return self.inputs == "any" and len(input_shape) != 3


@dataclass(frozen=True)
class Task:
    """A dataset × a model, with the dataset's loss and metrics (its `kind`) and a version.

    `package` and `version` are filled in by the registry from the distribution that declares
    the entry point (a `version` given here is kept); an inline task of the Python API has
    package None."""

    name: str
    dataset: Dataset
    model: Model
    version: str | None = None
    description: str | None = None
    package: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> Kind:
        return self.dataset.kind

    def shape(self, data: Mapping[str, Any]) -> DataShape:
        return self.dataset.shape_of(data)

    def input_shape(self, data: Mapping[str, Any]) -> tuple[int, ...]:
        return self.shape(data).input_shape

    def n_outputs(self, data: Mapping[str, Any]) -> int:
        return self.shape(data).n_outputs

    def n_classes(self, data: Mapping[str, Any]) -> int:
        """Classes of a classification task (its outputs); for a regression task, its outputs."""
        return self.n_outputs(data)

    def flat_input(self, data: Mapping[str, Any]) -> bool:
        return self.model.flat(self.input_shape(data))

    def model_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option the model declares: the given value, else the default (None given means
        the default too)."""
        return {
            o.name: given[o.name] if given.get(o.name) is not None else o.default
            for o in self.model.options
        }

    def build(self, data: Mapping[str, Any], given: Mapping[str, Any]) -> nn.Module:
        """The model for data options `data` and model options `given` (defaults filled in)."""
        shape = self.shape(data)
        return self.model.build(shape.input_shape, shape.n_outputs, **self.model_options(given))


class UnknownTaskError(ValueError):
    """No task of this name is installed in this process."""


class TaskMismatchError(ValueError):
    """This process has another version of a trial's task, or not its package at all: the same
    trial would fail the same way again (`worker.failures` does not retry it)."""

    def __init__(
        self,
        message: str,
        package: str | None = None,
        wanted: str | None = None,
        found: str | None = None,
    ) -> None:
        super().__init__(message)
        self.package, self.wanted, self.found = package, wanted, found

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses from a Ray worker to the driver
        return (type(self), (str(self), self.package, self.wanted, self.found))
