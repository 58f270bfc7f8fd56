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


def test_check_fit_reads_the_connected_cluster(
    ray_runtime: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session runtime is one node of 2 CPUs and no GPU; it has reported its resources, so
    after the (short) wait for a node that fits, the refusal is final."""
    monkeypatch.setenv(fit.NODE_WAIT_ENV, "0.5")
    fit.check_fit(2.0, 0.0)
    with pytest.raises(fit.NodeFitError, match=r"cpus_per_trial: 3 but the largest Ray node has 2"):
        fit.check_fit(3.0, 0.0)
    with pytest.raises(ValueError, match=r"gpus_per_trial: 1 but the largest Ray node has 0 GPUs"):
        fit.check_fit(1.0, 1.0)


class _Clock:
    """Time for `wait_for_fit` that moves only when it sleeps: the test decides what the
    cluster reports at each moment, and no test waits for real."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _reporting(timeline: list[tuple[float, list[dict[str, Any]]]], clock: _Clock) -> Any:
    """What `ray.nodes()` answers at each time: the last entry whose time has come."""

    def nodes() -> list[dict[str, Any]]:
        return [entry for at, entry in timeline if at <= clock.now][-1]

    return nodes


def test_a_node_that_reports_its_cpus_late_is_waited_for() -> None:
    """A restarted service's node registered, its CPUs not yet reported (the fault that failed
    every resumed study of the chaos soak): the driver waits, then runs."""
    clock = _Clock()
    registering = [{"Alive": True, "Resources": {}}]
    nodes = _reporting([(0.0, registering), (7.0, [_node(True, CPU=2.0)])], clock)
    fit.wait_for_fit(1.0, 0.0, nodes, 60.0, clock=clock, sleep=clock.sleep)
    assert 7.0 <= clock.now < 8.0


def test_a_second_node_that_joins_within_the_wait_holds_the_trial() -> None:
    clock = _Clock()
    head = [_node(True, CPU=0.0)]
    nodes = _reporting([(0.0, head), (20.0, [*head, _node(True, CPU=4.0)])], clock)
    fit.wait_for_fit(2.0, 0.0, nodes, 60.0, clock=clock, sleep=clock.sleep)
    assert 20.0 <= clock.now < 21.0


def test_nodes_that_reported_and_still_do_not_fit_are_a_refusal_after_the_wait() -> None:
    clock = _Clock()
    nodes = _reporting([(0.0, [_node(True, CPU=1.0), _node(True, CPU=1.0)])], clock)
    with pytest.raises(fit.NodeFitError, match="cpus_per_trial: 2 but the largest Ray node has 1"):
        fit.wait_for_fit(2.0, 0.0, nodes, 30.0, clock=clock, sleep=clock.sleep)
    assert clock.now == pytest.approx(30.0)


def test_nodes_that_never_report_are_not_ready_which_is_transient() -> None:
    from worker.failures import study_fault

    clock = _Clock()
    nodes = _reporting([(0.0, [{"Alive": True, "Resources": {}}])], clock)
    with pytest.raises(fit.ClusterNotReadyError, match="did not report their resources") as info:
        fit.wait_for_fit(1.0, 0.0, nodes, 30.0, clock=clock, sleep=clock.sleep)
    assert study_fault(info.value).retry
    assert not study_fault(fit.NodeFitError("cpus_per_trial", "too big")).retry


def test_resources_are_known_once_every_alive_node_reported_them() -> None:
    assert not fit.resources_known([])
    assert not fit.resources_known([_node(False, CPU=2.0)])
    assert not fit.resources_known([_node(True, CPU=2.0), {"Alive": True, "Resources": {}}])
    assert fit.resources_known([_node(True, CPU=0.0), _node(False)])
