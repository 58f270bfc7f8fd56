"""`ratebench.compare`: a study of your own model and data, run from Python.

    result = ratebench.compare(
        model=make_net,                          # a callable returning a fresh nn.Module
        data=(x_train, y_train, x_test, y_test),  # arrays, tensors or torch Datasets
        arms=["sgd", {"optimizer": "adam"}],
        budget={"trials_per_arm": 8, "epochs": 5, "final_seeds": 3},
    )
    result.leaderboard   # per arm: mean over final seeds, its interval, ties, the best rate
    result.plots("plots/")

What it does, and how that matches a spec sent to the service:

- The data become an inline task (`worker.tasks.contract.Task`, no package): the same checks,
  splits and standardisation as any task's (`worker.tasks.data`), a validation split cut from
  the training data by `data.split_seed` unless `x_val`/`y_val` are given, and the loss of its
  kind: integer targets make a classification (cross-entropy, accuracy), float targets a
  regression (mean squared error; the objective defaults to `val_loss`). Give `kind=` to say so
  yourself. The model gets each example as the data hold it (no flattening).
- Every other keyword is a field of a study spec (`budget`, `search_space`, `objective`,
  `sampler`, `pruner`, `resources`, `seed`), and `data_options` is its `data` object (batch size,
  splits), validated as the service validates one; an error names the field.
- Ray: a local runtime, or the cluster at `address`. The data go into Ray's object store once;
  each trial's task carries the model callable, pickled by Ray (cloudpickle): functions and
  classes defined in a notebook or in the script you run travel by value, those of your own
  modules must be importable on the workers.
- The study is recorded in `database_url` (default: the service's settings, `RATEBENCH_DATABASE_URL`
  or `data/ratebench.db` under the current folder) as a row of source "python", with its Optuna
  studies, claimed and finished as `ratebench run` does (`service.local_run`), so a service on
  the same database shows it on its pages, leaderboards and exports. Its key is the study's name
  and a hash of the spec, the data and the pickled model: calling `compare` again with the same
  ones resumes that study (a finished one is only summarised again).

This is the path on which the caller's code runs: on the caller's own machine or cluster. The
REST service never runs code that arrives in a request.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.tasks.contract import Dataset, DataShape, Kind, Model, Splits, Task

if TYPE_CHECKING:
    from torch import nn

    from worker.spec import StudySpec
    from worker.summary import ArmSummary

__all__ = ["Comparison", "compare"]

_SPLIT_NAMES = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")


@dataclass
class Comparison:
    """A finished (or stopped) study of `compare`: its id, status and ranked arms."""

    study_id: str
    name: str
    task: str
    status: str
    error: str | None
    database_url: str
    spec: StudySpec
    arms: list[ArmSummary] = field(repr=False)

    @property
    def leaderboard(self) -> list[dict[str, Any]]:
        """The arms, best first: the metric's mean over the final seeds with its interval, the
        arms the seeds cannot separate from it (`ties`, `too_few_seeds_to_tell`), its best rate
        and its test score."""
        return [
            {
                "rank": rank,
                "arm": row.arm,
                "scheme": row.scheme,
                "metric": row.metric,
                "mean": row.objective_mean,
                "std": row.objective_std,
                "interval": (row.interval_low, row.interval_high),
                "n_seeds": row.n_seeds,
                "ties": list(row.ties),
                "too_few_seeds_to_tell": list(row.too_few_seeds_to_tell),
                "best_lr": row.best_lr,
                "test": row.test_mean,
                "status": row.status,
            }
            for rank, row in enumerate(self.arms, start=1)
        ]

    @property
    def best_rates(self) -> dict[str, float | None]:
        """Each arm's best learning rate from its sweep."""
        return {row.arm: row.best_lr for row in self.arms}

    def plots(self, out: str | Path = ".", fmt: str = "png") -> list[Path]:
        """Write the study's plots (rate sensitivity, learning curves, per-layer factors) to
        `out`; returns their paths."""
        from worker.report import plots
        from worker.results import load_trials

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        trials = load_trials(self.database_url, self.study_id, self.spec)
        written = []
        for kind in plots.PLOTS:
            path = folder / f"{self.name}-{kind}.{fmt}"
            path.write_bytes(plots.render(kind, self.spec, trials, fmt))
            written.append(path)
        return written

    def __str__(self) -> str:
        lines = [f"{self.name} ({self.study_id}) on {self.task}: {self.status}"]
        if self.error:
            lines.append(f"error: {self.error}")
        for row in self.leaderboard:
            low, high = row["interval"]
            interval = "" if low is None or high is None else f" [{low:.4g}, {high:.4g}]"
            mean = "-" if row["mean"] is None else f"{row['mean']:.4g}"
            lr = "-" if row["best_lr"] is None else f"{row['best_lr']:.3g}"
            ties = f", ties {', '.join(row['ties'])}" if row["ties"] else ""
            lines.append(
                f"{row['rank']}. {row['arm']}: {row['metric']} {mean}{interval} over "
                f"{row['n_seeds']} seeds, best lr {lr}{ties}"
            )
        return "\n".join(lines)


def _array(value: Any, name: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"data {name}: an array, a tensor or a torch Dataset; {exc}") from None


def _splits(data: Any) -> Splits:
    """The user's data as `Splits` of numpy arrays (torch Datasets read into memory)."""
    from worker.tasks.data import materialise

    if isinstance(data, Splits):
        splits = data
    elif isinstance(data, Mapping):
        unknown = set(data) - set(_SPLIT_NAMES)
        if unknown:
            raise ValueError(
                f"data: unknown keys {sorted(unknown)}; give {', '.join(_SPLIT_NAMES[:4])} "
                "and optionally x_val, y_val"
            )
        splits = Splits(**data)
    elif isinstance(data, Sequence) and len(data) in (4, 6):
        splits = Splits(**dict(zip(_SPLIT_NAMES, data, strict=False)))
    else:
        raise TypeError(
            "data: (x_train, y_train, x_test, y_test[, x_val, y_val]), a dict of those, or "
            "ratebench.Splits"
        )
    splits = materialise(splits)
    return Splits(
        **{
            n: None if getattr(splits, n) is None else _array(getattr(splits, n), n)
            for n in _SPLIT_NAMES
        }
    )


def _kind(splits: Splits, kind: Kind | None) -> Kind:
    if kind is not None:
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind: 'classification' or 'regression', got {kind!r}")
        return kind
    return "classification" if splits.y_train.dtype.kind in "iub" else "regression"


def _n_outputs(splits: Splits, kind: Kind) -> int:
    if kind == "regression":
        return 1 if splits.y_train.ndim == 1 else int(np.prod(splits.y_train.shape[1:]))
    labels = [getattr(splits, n) for n in ("y_train", "y_val", "y_test")]
    return max(int(np.max(y)) for y in labels if y is not None and len(y)) + 1


class _Stored:
    """The data in Ray's object store: what each trial's task reads (once per process)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __call__(self, options: Mapping[str, Any]) -> Splits:
        import ray

        splits: Splits = ray.get(self.ref)
        return splits

    def key(self, options: Mapping[str, Any]) -> str:
        return str(self.ref.hex())


class _Build:
    """The user's model callable as a task's builder: `model()` returns a fresh module."""

    def __init__(self, model: Callable[[], nn.Module]) -> None:
        self.model = model

    def __call__(self, input_shape: tuple[int, ...], n_outputs: int, **options: Any) -> nn.Module:
        from torch import nn

        built = self.model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"model() returned {type(built).__name__}, not a torch.nn.Module")
        return built


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:60] or "model"


def _digest(splits: Splits, pickled_model: bytes, spec: StudySpec) -> str:
    digest = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
    for name in _SPLIT_NAMES:
        array = getattr(splits, name)
        if array is not None:
            digest.update(f"{name}{array.dtype}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(pickled_model)
    return digest.hexdigest()


def compare(
    model: Callable[[], nn.Module],
    data: Any,
    arms: Sequence[str | Mapping[str, Any]],
    *,
    name: str = "compare",
    task: str | None = None,
    kind: Kind | None = None,
    database_url: str | None = None,
    address: str | None = None,
    study_key: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    **spec: Any,
) -> Comparison:
    """Compare `arms` (scheme names, or spec arms such as `{"optimizer": "sgd", "fixed":
    {"momentum": 0.9}}`) on your `model` and `data`; see the module docstring. Returns the
    study's `Comparison` once every arm's sweep and final seeds have run."""
    import ray
    from pydantic import ValidationError
    from rich.console import Console

    from service.config import get_settings
    from service.local_run import run_recorded
    from service.models import StudySource
    from worker import cluster
    from worker.spec import StudySpec, format_errors
    from worker.tasks.data import check_splits
    from worker.tasks.registry import register

    splits = _splits(data)
    task_kind = _kind(splits, kind)
    n_outputs = _n_outputs(splits, task_kind)
    check_splits(splits, task_kind, n_outputs, "ratebench.compare data")
    try:
        pickled = ray.cloudpickle.dumps(model)
    except Exception as exc:
        raise TypeError(f"model: Ray cannot ship it to its workers: {exc}") from None
    task_name = task or f"python-{_slug(getattr(model, '__name__', 'model'))}"
    stored = _Stored(None)  # the data go to Ray's object store once the spec is valid
    shape = DataShape(
        tuple(splits.x_train.shape[1:]), n_outputs, len(splits.y_train), splits.x_val is not None
    )
    dataset = Dataset(
        task_name, "arrays given to ratebench.compare", task_kind, stored, shape,
        cache_key=stored.key,
    )  # fmt: skip
    described = f"{getattr(model, '__qualname__', repr(model))} (ratebench.compare)"
    net = Model(task_name, described, _Build(model), inputs="as_given")
    description = f"{task_kind} of the caller's model and data (Python API)"
    inline = register(Task(task_name, dataset, net, description=description))
    body = {"name": name, "task": inline.name, "arms": [_arm(a) for a in arms], **spec}
    if data_options is not None:
        body["data"] = dict(data_options)
    try:
        study = StudySpec.model_validate(body)
    except ValidationError as exc:
        lines = "\n".join(f"  {line}" for line in format_errors(exc))
        raise ValueError(f"ratebench.compare: not a valid study:\n{lines}") from None
    cluster.connect(address, log_to_driver=False)
    stored.ref = ray.put(splits)
    url = database_url or get_settings().resolved_database_url()
    key = study_key or f"{_slug(name)}-{_digest(splits, pickled, study)[:10]}"
    console = Console(stderr=True) if progress else Console(file=io.StringIO())
    result, status, error = run_recorded(study, url, key, address, console, StudySource.PYTHON)
    return Comparison(key, name, inline.name, status, error, url, study, result.arms)


def _arm(arm: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"optimizer": arm} if isinstance(arm, str) else dict(arm)
