"""Whether a trial fits on one node of the Ray cluster.

A trial is one Ray task, and a task runs on one node: a cluster of two 1-CPU nodes has 2 CPUs
in all but cannot place a trial that asks for 2, and Ray would keep such a task pending
forever. So a spec's `resources.cpus_per_trial` and `gpus_per_trial` are compared with the
largest alive node's CPUs and GPUs (each resource on its own: the node with the most GPUs need
not be the one with the most CPUs, and a request is refused only when no node has enough of
that resource), never with the cluster's totals. The API refuses such a spec at submit when it
is connected to Ray and the cluster's nodes have reported their resources; the driver checks
again when the study starts (`worker.sweep`).

A cluster that is starting or restarting (a service restarted after a crash, a node coming
back) may not have reported every node's resources yet, or a node that will hold the trial may
still be joining. So the driver's check waits (`wait_for_fit`, bounded by
`RATEBENCH_NODE_WAIT_S`) for a node that fits, and only then decides: a cluster whose nodes all
reported their resources and none fits is a deterministic refusal (`NodeFitError`: the study
fails with it); a cluster that reported none is not ready (`ClusterNotReadyError`, transient:
the study is resumed later).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "NODE_WAIT_ENV",
    "ClusterNotReadyError",
    "NodeFitError",
    "check_fit",
    "cluster_fit_problem",
    "fit_problem",
    "largest_node",
    "resources_known",
    "wait_for_fit",
]

log = logging.getLogger(__name__)

NODE_WAIT_ENV = "RATEBENCH_NODE_WAIT_S"
_DEFAULT_NODE_WAIT_S = 60.0
_POLL_S = 0.5

_FIELDS = (("cpus_per_trial", "CPU", "CPUs"), ("gpus_per_trial", "GPU", "GPUs"))


class ClusterNotReadyError(ConnectionError):
    """Ray's nodes have not (yet) reported their resources: a cluster starting or restarting,
    not a verdict on the spec; transient (`worker.failures.study_fault`)."""


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


def resources_known(nodes: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the cluster has said what it holds: at least one node alive, and every alive
    node reporting its resources (a raylet that has registered but not yet reported them shows
    none, not even its memory)."""
    alive = [node for node in nodes if node.get("Alive", False)]
    return bool(alive) and all(node.get("Resources") for node in alive)


def cluster_fit_problem(cpus: float, gpus: float) -> NodeFitError | None:
    """`fit_problem` against the nodes of the Ray cluster this process is connected to; None
    while the nodes have not reported their resources (the driver decides later)."""
    import ray

    nodes = ray.nodes()
    if not resources_known(nodes):
        return None
    return fit_problem(cpus, gpus, largest_node(nodes))


def node_wait_s() -> float:
    """Seconds the driver waits for a node that fits (`RATEBENCH_NODE_WAIT_S`, default 60)."""
    raw = os.environ.get(NODE_WAIT_ENV, "").strip()
    if not raw:
        return _DEFAULT_NODE_WAIT_S
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{NODE_WAIT_ENV}: expected seconds, got {raw!r}") from None
    if not seconds >= 0:
        raise ValueError(f"{NODE_WAIT_ENV}: must be at least 0, got {raw!r}")
    return seconds


def wait_for_fit(
    cpus: float,
    gpus: float,
    nodes: Callable[[], list[dict[str, Any]]],
    timeout_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once some alive node (from `nodes()`, Ray's `ray.nodes`) can hold the trial;
    after `timeout_s` raise NodeFitError when the nodes reported their resources and none
    fits, or ClusterNotReadyError when they never did (see the module doc)."""
    deadline = clock() + timeout_s
    waited = False
    while True:
        current = nodes()
        problem = fit_problem(cpus, gpus, largest_node(current))
        if problem is None:
            if waited:
                log.info("a Ray node that holds a trial (%g CPUs, %g GPUs) is there now",
                         cpus, gpus)  # fmt: skip
            return
        if clock() >= deadline:
            if resources_known(current):
                raise problem
            raise ClusterNotReadyError(
                f"Ray's nodes did not report their resources within {timeout_s:g} s "
                f"({NODE_WAIT_ENV}); the cluster is starting or restarting"
            )
        if not waited:
            log.info("waiting up to %g s for a Ray node that holds a trial (%s)", timeout_s,
                     problem)  # fmt: skip
            waited = True
        sleep(min(_POLL_S, max(0.0, deadline - clock())))


def check_fit(cpus: float, gpus: float) -> None:
    """`wait_for_fit` on the connected cluster, for `RATEBENCH_NODE_WAIT_S` at most."""
    import ray

    wait_for_fit(cpus, gpus, ray.nodes, node_wait_s())
