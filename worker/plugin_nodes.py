"""Whether every node of the Ray cluster has a plugin task's package, at the version here.

A plugin task's code is an installed package (`worker.tasks.registry`), and a trial runs on
whichever node Ray picks, so a node without the package, or with another version, would fail
its trials (`worker.tasks.require` refuses them, not retried). The API, when it is connected to
the cluster, asks every alive node at submission instead: one tiny task pinned to each node
(no CPU reserved) reads the package's installed version with `importlib.metadata`, importing
neither the plugin nor PyTorch. A spec naming such a task is refused with a 422 naming the
node, the package and both versions. ratebench's own tasks are not asked about (every node runs
ratebench itself). A node that does not answer within the timeout is left to the trials' own
check; an answer that all nodes agree is remembered for `_REMEMBER_S` seconds per package and
version, so a burst of submits asks once.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time

import ray

__all__ = ["cluster_package_problem"]

log = logging.getLogger(__name__)

_TIMEOUT_S = 30.0
_REMEMBER_S = 300.0
_agreed: dict[tuple[str, str, frozenset[str]], float] = {}
_lock = threading.Lock()


@ray.remote(num_cpus=0, max_retries=0)
def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cluster_package_problem(package: str, version: str, task: str) -> str | None:
    """Why some alive node of the connected cluster cannot run `task` (its package missing or
    at another version than `version`), or None."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    key = (package, version, frozenset(nodes))
    with _lock:  # concurrent submits ask once
        if time.monotonic() < _agreed.get(key, 0.0):
            return None
        refs = {
            _installed.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                name=f"ratebench package check {package}",
            ).remote(package): node_id
            for node_id in nodes
        }
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=_TIMEOUT_S)
        for ref in pending:
            log.warning("node %s did not say which %s it has within %.0f s", nodes[refs[ref]],
                        package, _TIMEOUT_S)  # fmt: skip
            ray.cancel(ref, force=True)
        for ref in done:
            found = ray.get(ref)
            if found != version:
                node = f"{nodes[refs[ref]]} ({refs[ref][:8]})"
                has = f"has {package} {found}" if found else f"lacks {package}"
                return (
                    f"task {task!r}: the Ray node {node} {has}, this service {package} "
                    f"{version}; install {package}=={version} on every node"
                )
        if not pending:
            _agreed[key] = time.monotonic() + _REMEMBER_S
    return None
