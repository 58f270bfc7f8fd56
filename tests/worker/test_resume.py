"""A sweep killed (SIGKILL) and resumed runs the rates an uninterrupted one runs.

The killed driver is `ratebench run` in its own process group, joined to the test's Ray runtime;
the test polls the storage until k sweep trials have finished, kills the group, and resumes the
study in-process, which fails the trials left RUNNING as stale and retries them. Random and grid
proposals do not depend on results, so the set of rates must equal an uninterrupted run's: one
reference run per sampler (SQLite, shared by the cases), compared with runs killed after
different k. Grid runs on both databases, random on SQLite (the sampler does not see the
database). The networks are tiny: the test is about which rates ran, not what they scored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from worker.arms.optuna.sampling import grid_values, make_sampler, suggest
from worker.results import load_trials
from worker.spec import StudySpec
from worker.storage import open_storage, study_trials
from worker.sweep import run_study

_DEADLINE_S = 240  # a loaded machine starts the CLI, joins Ray and warms workers slowly
_TRIALS = 6


def _spec(sampler: str) -> dict[str, Any]:
    return {
        "name": f"resume-{sampler}",
        "task": "digits-mlp",
        "data": {"batch_size": 32, "n_train": 64, "n_val": 32, "n_test": 32},
        "model": {"width": 4, "depth": 1},
        "arms": [{"optimizer": "sgd"}],
        "search_space": {"lr": {"low": 0.001, "high": 1.0, "log": True}},
        "budget": {"trials_per_arm": _TRIALS, "epochs": 1, "final_seeds": 1},
        "sampler": sampler,
        "pruner": "none",
        "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2, "device": "cpu"},
    }


def _finished(url: str, name: str) -> int:
    storage = open_storage(url)
    try:
        return sum(t.state.is_finished() for t in study_trials(storage, name))
    finally:
        storage.engine.dispose()


def _kill_after(path: Path, url: str, key: str, k: int) -> None:
    """Run `ratebench run` until k sweep trials of the study have finished, then SIGKILL it."""
    import ray

    env = {**os.environ, "RATEBENCH_NODE_IP": ray.util.get_node_ip_address()}
    command = [sys.executable, "-m", "service.cli", "run", str(path), "--database-url", url]
    command += ["--ray-address", ray.get_runtime_context().gcs_address, "--study-key", key]
    process = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + _DEADLINE_S
    try:
        while _finished(url, f"{key}/sgd") < k:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"the sweep ended before {k} trials: {process.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, f"{k} trials did not finish in {_DEADLINE_S} s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert process.stderr is not None
        process.stderr.close()


def _sweep_rates(url: str, key: str, spec: StudySpec) -> list[float]:
    """The rate of every finished sweep trial (a retried trial counts once: when it finished)."""
    trials = [t for t in load_trials(url, key, spec) if t.role == "sweep"]
    return sorted(t.params["lr"] for t in trials if t.state == "COMPLETE")


@pytest.mark.parametrize("sampler", ["random", "grid"])
def test_a_retry_of_a_trial_that_died_before_asking_gets_the_proposal_it_would_have_had(
    sampler: str,
) -> None:
    """A driver killed between creating a trial and storing its parameters leaves an original
    without parameters; its retry asks the sampler, and must get the original's proposal, so
    that no rate runs twice and none is skipped (the draw index follows `retry_of`)."""
    spec = StudySpec.model_validate(_spec(sampler))
    space = spec.arm_search_space(spec.arms[0])

    def study() -> optuna.Study:
        return optuna.create_study(sampler=make_sampler(spec, space, "sgd", spec.seed))

    whole = study()
    expected = [suggest(whole.ask(), space, "sgd")["lr"] for _ in range(3)]

    resumed = study()
    first = resumed.ask()
    rates = [suggest(first, space, "sgd")["lr"]]
    resumed.tell(first, 0.5)
    died = resumed.ask()  # no parameters: the driver died here
    resumed.tell(died, state=TrialState.FAIL)
    resumed.enqueue_trial({}, user_attrs={"retry_of": died.number, "attempt": 2})
    rates += [suggest(resumed.ask(), space, "sgd")["lr"] for _ in range(2)]  # retry, then new
    assert rates == expected


@pytest.fixture(scope="module")
def uninterrupted(ray_runtime: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each sampler's sweep rates when nothing interrupts it (one run per sampler)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('uninterrupted') / 'ratebench.db'}"
    rates = {}
    for sampler in ("grid", "random"):
        spec = StudySpec.model_validate(_spec(sampler))
        assert not run_study(spec, url, f"whole-{sampler}").stopped
        rates[sampler] = _sweep_rates(url, f"whole-{sampler}", spec)
    return rates


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "database", "k"),
    [
        ("grid", "sqlite", 1),
        ("grid", "postgres", 3),
        ("random", "sqlite", 2),
    ],
)
def test_a_killed_and_resumed_sweep_runs_the_uninterrupted_rates(
    uninterrupted: dict[str, Any],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sampler: str,
    database: str,
    k: int,
) -> None:
    url = str(request.getfixturevalue(f"{database}_url"))
    data = _spec(sampler)
    spec = StudySpec.model_validate(data)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))

    _kill_after(path, url, "killed", k)
    resumed = run_study(spec, url, "killed")

    assert not resumed.stopped
    trials = [t for t in load_trials(url, "killed", spec) if t.role == "sweep"]
    assert len([t for t in trials if "retry_of" not in t.user_attrs]) == _TRIALS
    assert _sweep_rates(url, "killed", spec) == uninterrupted[sampler]
    assert len(uninterrupted[sampler]) == _TRIALS
    if sampler == "grid":  # as many trials as points: every point exactly once
        grid = grid_values(spec, spec.arm_search_space(spec.arms[0]), "sgd")["lr"]
        assert uninterrupted[sampler] == sorted(grid)
