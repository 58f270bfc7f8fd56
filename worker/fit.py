"""Whether a trial fits on one node of the Ray cluster.

A trial is one Ray task, and a task runs on one node: a cluster of two 1-CPU nodes has 2 CPUs
in all but cannot place a trial that asks for 2, and Ray would keep such a task pending
forever. So a spec's `resources.cpus_per_trial` and `gpus_per_trial` are compared with the
largest alive node's CPUs and GPUs (each resource on its own: the node with the most GPUs need
not be the one with the most CPUs, and a request is refused only when no node has enough of
that resource), never with the cluster's totals. The API refuses such a spec at submit when it
is connected to Ray; the driver checks again when the study starts (`worker.sweep`), which
fails the study with the same message instead of leaving it waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["NodeFitError", "check_fit", "cluster_fit_problem", "fit_problem", "largest_node"]

_FIELDS = (("cpus_per_trial", "CPU", "CPUs"), ("gpus_per_trial", "GPU", "GPUs"))


class NodeFitError(ValueError):
    """A trial that no single node can hold; `field` is the spec field (`cpus_per_trial` or
    `gpus_per_trial` under `resources`) and the message names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def largest_node(nodes: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The most CPUs and the most GPUs any one alive node has, from `ray.nodes()` entries
    (`Alive`, `Resources`); {"CPU": 0, "GPU": 0} when none is alive."""
    best = {"CPU": 0.0, "GPU": 0.0}
    for node in nodes:
        if not node.get("Alive", False):
            continue
        resources = node.get("Resources") or {}
        for name in best:
            best[name] = max(best[name], float(resources.get(name, 0.0)))
    return best


def fit_problem(cpus: float, gpus: float, largest: Mapping[str, float]) -> NodeFitError | None:
    """The refusal for a trial of `cpus` and `gpus` given the largest node's figures, or None
    when some node can hold it (GPUs first: the scarcer resource is the likelier mistake)."""
    asked = {"cpus_per_trial": cpus, "gpus_per_trial": gpus}
    for field, name, plural in reversed(_FIELDS):
        want, have = asked[field], float(largest.get(name, 0.0))
        if want > have:
            return NodeFitError(
                field,
                f"resources.{field}: {want:g} but the largest Ray node has {have:g} {plural} "
                "(a trial runs on one node)",
            )
    return None


def cluster_fit_problem(cpus: float, gpus: float) -> NodeFitError | None:
    """`fit_problem` against the nodes of the Ray cluster this process is connected to."""
    import ray

    return fit_problem(cpus, gpus, largest_node(ray.nodes()))


def check_fit(cpus: float, gpus: float) -> None:
    """Raise NodeFitError when no alive node of the connected cluster can hold the trial."""
    problem = cluster_fit_problem(cpus, gpus)
    if problem is not None:
        raise problem
