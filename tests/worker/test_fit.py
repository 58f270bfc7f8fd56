"""A trial must fit on one node: the largest alive node's CPUs and GPUs, not the cluster's
totals, bound `resources.cpus_per_trial` and `gpus_per_trial`."""

from __future__ import annotations

from typing import Any

import pytest

from worker import fit


def _node(alive: bool, **resources: float) -> dict[str, Any]:
    return {"Alive": alive, "Resources": {"memory": 1e9, "node:127.0.0.1": 1.0, **resources}}


def test_largest_node_takes_each_resource_from_alive_nodes_only() -> None:
    nodes = [
        _node(True, CPU=4.0),
        _node(True, CPU=2.0, GPU=1.0),
        _node(False, CPU=64.0, GPU=8.0),  # dead: its resources are gone
        _node(True, CPU=1.0, GPU=2.0),
    ]
    assert fit.largest_node(nodes) == {"CPU": 4.0, "GPU": 2.0}


def test_largest_node_of_no_alive_node_is_empty() -> None:
    assert fit.largest_node([]) == {"CPU": 0.0, "GPU": 0.0}
    assert fit.largest_node([_node(False, CPU=8.0)]) == {"CPU": 0.0, "GPU": 0.0}
    assert fit.largest_node([{"Alive": True}]) == {"CPU": 0.0, "GPU": 0.0}


def test_two_one_cpu_nodes_refuse_a_two_cpu_trial_the_totals_would_allow() -> None:
    largest = fit.largest_node([_node(True, CPU=1.0), _node(True, CPU=1.0)])
    problem = fit.fit_problem(2.0, 0.0, largest)
    assert problem is not None and problem.field == "cpus_per_trial"
    assert str(problem) == (
        "resources.cpus_per_trial: 2 but the largest Ray node has 1 CPUs (a trial runs on one node)"
    )
    assert fit.fit_problem(1.0, 0.0, largest) is None
    assert fit.fit_problem(0.5, 0.0, largest) is None


def test_gpus_are_checked_against_the_node_with_the_most_gpus() -> None:
    largest = fit.largest_node([_node(True, CPU=8.0, GPU=1.0), _node(True, CPU=8.0, GPU=1.0)])
    problem = fit.fit_problem(1.0, 1.5, largest)
    assert problem is not None and problem.field == "gpus_per_trial"
    assert "resources.gpus_per_trial: 1.5 but the largest Ray node has 1 GPUs" in str(problem)
    assert fit.fit_problem(1.0, 0.5, largest) is None


def test_check_fit_reads_the_connected_cluster(ray_runtime: None) -> None:
    """The session runtime is one node of 2 CPUs and no GPU."""
    fit.check_fit(2.0, 0.0)
    with pytest.raises(fit.NodeFitError, match=r"cpus_per_trial: 3 but the largest Ray node has 2"):
        fit.check_fit(3.0, 0.0)
    with pytest.raises(ValueError, match=r"gpus_per_trial: 1 but the largest Ray node has 0 GPUs"):
        fit.check_fit(1.0, 1.0)
