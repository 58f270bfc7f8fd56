"""The task registry: every task this process can run, found once through Python entry points.

A package provides tasks by declaring, in its `pyproject.toml`,

    [project.entry-points."ratebench.tasks"]
    friedman = "ratebench_friedman:tasks"

where the object is a `worker.tasks.contract.Task`, or a callable with no arguments returning an
iterable of them. ratebench's own tasks are declared the same way (`worker.tasks.builtin`).
The entry points are read the first time a task is asked for, once per process (`tasks()`); a
package installed later is seen by processes started later. Each task gets the distribution's
name as its `package` and, unless it declares its own, the distribution's version as its
`version`. A task name is `[a-z0-9][a-z0-9._-]*`; two packages declaring the same name, an entry
point that fails to load or returns something other than tasks are logged and skipped, so one
broken plugin never hides the others (the log names the entry point and the error).

`require(name, package, version)` is what a worker calls before it trains: the task as the
driver had it, or `TaskMismatchError` naming the package and both versions.

Inline tasks (the Python API, `ratebench.compare`) are registered in the caller's process with
`register` and travel to the workers inside the trial's configuration; they have no package.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
from collections.abc import Iterable
from typing import Any

from worker.tasks.contract import Task, TaskMismatchError, UnknownTaskError

__all__ = [
    "ENTRY_POINT_GROUP",
    "OWN_DISTRIBUTION",
    "describe_tasks",
    "get_task",
    "installed_version",
    "register",
    "require",
    "tasks",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ratebench.tasks"
OWN_DISTRIBUTION = "ratebench"
_OWN_ENTRY_POINT = "worker.tasks.builtin:tasks"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")

_inline: dict[str, Task] = {}


def _provided(obj: Any) -> list[Task]:
    """The tasks an entry point's object provides: a Task, or a callable returning some."""
    found = obj() if callable(obj) and not isinstance(obj, Task) else obj
    if isinstance(found, Task):
        return [found]
    if not isinstance(found, Iterable):
        raise TypeError(f"expected a Task or tasks, got {type(found).__name__}")
    items = list(found)
    wrong = [type(t).__name__ for t in items if not isinstance(t, Task)]
    if wrong:
        raise TypeError(f"expected Task objects, got {', '.join(sorted(set(wrong)))}")
    return items


def _stamped(task: Task, package: str | None, version: str | None) -> Task:
    from dataclasses import replace

    return replace(task, package=package, version=task.version or version)


def _entry_points() -> list[tuple[Any, str | None, str | None]]:
    """(entry point, distribution name, its version) of the group, ratebench's own first."""
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        name = dist.metadata["Name"] if dist is not None else None
        found.append((ep, name, dist.version if dist is not None else None))
    found.sort(key=lambda item: (item[1] != OWN_DISTRIBUTION, item[1] or "", item[0].name))
    return found


def _load_entry_points() -> dict[str, Task]:
    registry: dict[str, Task] = {}
    points = _entry_points()
    if not any(ep.value == _OWN_ENTRY_POINT for ep, _, _ in points):
        # An install from before the entry point existed: the same provider, found by name.
        log.warning(
            "ratebench's own entry point %s is not installed (an old install: run scripts/setup);"
            " loading the built-in tasks directly",
            _OWN_ENTRY_POINT,
        )
        points.insert(0, (_OwnEntryPoint(), OWN_DISTRIBUTION, installed_version(OWN_DISTRIBUTION)))
    for ep, package, version in points:
        where = f"entry point {ep.name!r} ({ep.value}) of {package or 'an unknown package'}"
        try:
            provided = _provided(ep.load())
        except Exception:
            log.exception("skipping the tasks of %s: it failed to load", where)
            continue
        for task in provided:
            if not NAME_PATTERN.match(task.name):
                log.error("skipping task %r of %s: a task name is %s", task.name, where,
                          NAME_PATTERN.pattern)  # fmt: skip
            elif task.name in registry:
                log.error("skipping task %r of %s: %s already provides it", task.name, where,
                          registry[task.name].package)  # fmt: skip
            else:
                registry[task.name] = _stamped(task, package, version)
    return registry


class _OwnEntryPoint:
    name = "builtin"
    value = _OWN_ENTRY_POINT

    def load(self) -> Any:
        from worker.tasks.builtin import tasks

        return tasks


@functools.cache
def _installed() -> dict[str, Task]:
    return _load_entry_points()


def tasks() -> dict[str, Task]:
    """Every task of this process by name: the installed ones, then the inline ones."""
    return {**_installed(), **_inline}


def get_task(name: str) -> Task:
    """The task called `name`, or UnknownTaskError listing the known ones."""
    found = _inline.get(name) or _installed().get(name)
    if found is None:
        raise UnknownTaskError(f"unknown task {name!r}; known: {', '.join(tasks())}")
    return found


def register(task: Task) -> Task:
    """Add an inline task (no package) to this process's registry; an installed task's name is
    refused."""
    if not NAME_PATTERN.match(task.name):
        raise ValueError(f"task name {task.name!r}: use {NAME_PATTERN.pattern}")
    if task.name in _installed():
        owner = _installed()[task.name].package
        raise ValueError(
            f"task name {task.name!r} is the installed task of {owner}; choose another"
        )
    _inline[task.name] = _stamped(task, None, task.version)
    return _inline[task.name]


def installed_version(package: str) -> str | None:
    """The installed version of distribution `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(name: str, package: str | None, version: str | None) -> Task:
    """The task `name` as the driver had it (from `package` at `version`), or
    TaskMismatchError saying what this process has instead."""
    found = _inline.get(name) or _installed().get(name)
    if found is not None and found.package == package and found.version == version:
        return found
    here = installed_version(package) if package else None
    if found is None and here is None:
        message = (
            f"task {name!r} needs the package {package} {version}, which is not installed on "
            f"this worker; install {package}=={version} on every Ray node"
        )
    elif found is None:
        message = (
            f"task {name!r}: this worker has {package} {here}, which provides no such task "
            f"(the study was validated with {package} {version}); install {package}=={version}"
        )
    else:
        message = (
            f"task {name!r} comes from {found.package} {found.version} on this worker, but the "
            f"study was validated with {package} {version}; install {package}=={version} on "
            "every Ray node"
        )
    raise TaskMismatchError(message, package, version, found.version if found else here)


def describe_tasks() -> list[dict[str, Any]]:
    """Every installed task for clients building a spec (`GET /api/v1/tasks`): its package and
    version, dataset and model, loss and metrics, default input shape and outputs (None when the
    data options or files decide them), the data options it takes and the model's options."""
    from worker.tasks.losses import LOSSES

    described = []
    for task in _installed().values():
        try:
            shape = task.shape({})
            input_shape: list[int] | None = list(shape.input_shape)
            outputs: int | None = shape.n_outputs
        except Exception:  # a files dataset without data_dir, a plugin that needs options
            input_shape, outputs = None, None
        loss = LOSSES[task.kind]
        described.append(
            {
                "name": task.name,
                "package": task.package,
                "version": task.version,
                "dataset": task.dataset.name,
                "model": task.model.name,
                "description": task.description
                or f"{task.dataset.description}; {task.model.description}",
                "kind": task.kind,
                "loss": loss.name,
                "metrics": list(loss.metrics),
                "input_shape": input_shape,
                "n_classes": outputs if task.kind == "classification" else None,
                "n_outputs": outputs,
                "model_inputs": task.model.inputs,
                "data_options": sorted(task.dataset.options),
                "options": [o.describe() for o in task.model.options],
            }
        )
    return described
