"""Faults never fail a study: each fault the chaos soak injects, alone, on real parts.

- the study's mailbox actor killed (SIGKILL of its process) while trials run: the scheduler
  notes the fault and resumes the study on the same Ray runtime (tests' session runtime);
- the raylet of a service's own local Ray runtime killed while trials run: the service starts
  Ray again on its main thread and resumes the study.

A service killed and restarted is tests/service/test_e2e.py's; all of them together, with
PostgreSQL restarts and readers polling, are the chaos soak's (`scripts/chaos`,
tests/service/test_chaos.py).

Each checks *what* ran, not how many: every grid point finished exactly once, every final
seed once, nothing left RUNNING or WAITING (`worker.results.integrity_problems`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from service import queue
from service.db import get_engine, migrate, session_scope
from service.models import StudyRecord
from service.processes import command_line, descendants, outermost
from service.scheduler import Scheduler, SchedulerConfig
from tests.service.helpers import (
    ServiceProcess,
    embedded_service,
    get,
    wait_for,
    wait_until_finished,
)
from tests.worker.helpers import watch_running_trials
from worker.results import integrity_problems, load_trials
from worker.spec import StudySpec
from worker.sweep import MAILBOX_NAMESPACE

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RATES = [0.01, 0.03, 0.1, 0.3]


def grid_spec(epochs: int = 30, **resources: Any) -> dict[str, Any]:
    """Two arms on a 4-point grid of small digits trials, slow enough (a second or more each)
    that a fault lands while some run."""
    return {
        "name": "faults",
        "task": "digits-mlp",
        "data": {"batch_size": 32, "n_train": 512, "n_val": 128, "n_test": 128},
        "model": {"width": 16, "depth": 1},
        "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
        "search_space": {"lr": {"values": RATES}},
        "budget": {"trials_per_arm": len(RATES), "epochs": epochs, "final_seeds": 2},
        "sampler": "grid",
        "pruner": "none",
        "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2, "device": "cpu",
                      "cohort_size": 1, **resources},
    }  # fmt: skip


def whole(storage_url: str, study_id: str, spec: dict[str, Any]) -> list[str]:
    stored = StudySpec.from_stored(spec)
    return integrity_problems(load_trials(storage_url, study_id, stored), stored)


def mailbox_pid(study_id: str) -> int | None:
    """The process of the study's mailbox actor (`worker.sweep`), found by its name."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == MAILBOX_NAMESPACE and actor["name"].startswith(
            f"mailbox:{study_id}:"
        ):
            handle = ray.get_actor(actor["name"], namespace=MAILBOX_NAMESPACE)
            return int(ray.get(handle.pid.remote(), timeout=30))
    return None


@pytest.mark.timeout(900)  # a study of 8 trials on a busy machine
def test_a_killed_mailbox_actor_is_a_fault_the_study_survives(
    ray_runtime: None, sqlite_url: str
) -> None:
    migrate(sqlite_url)
    engine = get_engine(sqlite_url)
    spec = grid_spec()
    with session_scope(engine) as session:
        study_id = queue.submit(session, spec, name="faults", task=spec["task"])[0].id
    killed: list[int] = []

    def kill_the_mailbox(running: list[Any]) -> bool:
        pid = mailbox_pid(study_id)
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return True

    watcher = watch_running_trials(sqlite_url, f"{study_id}/sgd", kill_the_mailbox)
    config = SchedulerConfig(storage_url=sqlite_url, scheduler_id="faults")
    assert Scheduler(engine, config).run_once()
    watcher.join(timeout=60)
    assert killed, "the mailbox was never found while trials ran"
    with session_scope(engine) as session:
        study = session.get(StudyRecord, study_id)
        assert study is not None
        assert study.status == "completed", study.error
        faults = study.faults or []
        assert len(faults) == 1 and "ActorDiedError" in faults[0]["error"], faults
        assert study.attempts == 2
    assert whole(sqlite_url, study_id, spec) == []


@pytest.mark.timeout(900)
def test_ratebench_run_resumes_its_study_after_its_mailbox_is_killed(
    ray_runtime: None, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ratebench run` drives on the main thread; a fault there is resumed as the scheduler
    resumes one (`service.cli._run`)."""
    import json

    from service.cli import main

    spec_file = tmp_path / "spec.json"
    spec = grid_spec()
    spec_file.write_text(json.dumps(spec))
    killed: list[int] = []

    def kill_the_mailbox(running: list[Any]) -> bool:
        pid = mailbox_pid("run-faults")
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return bool(killed)

    watcher = watch_running_trials(sqlite_url, "run-faults/sgd", kill_the_mailbox)
    args = ["run", str(spec_file), "--database-url", sqlite_url, "--study-key", "run-faults"]
    assert main(args) == 0
    watcher.join(timeout=60)
    assert killed
    assert "ActorDiedError" in capsys.readouterr().err  # "fault: …; resuming the study"
    with session_scope(get_engine(sqlite_url)) as session:
        study = session.get(StudyRecord, "run-faults")
        assert study is not None and study.status == "completed", study and study.error
        assert len(study.faults or []) == 1
    assert whole(sqlite_url, "run-faults", spec) == []


def trials_running(service: ServiceProcess, study_id: str) -> bool:
    page = get(service, f"/studies/{study_id}/trials?limit=200")
    return any(t["state"] == "RUNNING" for t in page["items"])


@pytest.fixture
def service(tmp_path: Path) -> Any:
    """`ratebench serve` with its own local Ray runtime, as a user runs it."""
    yield from embedded_service(tmp_path / "service")


def submit(service: ServiceProcess, spec: dict[str, Any]) -> str:
    from tests.service.helpers import ratebench

    key = ratebench("keys", "create", "--name", "faults", env=service.env).strip()
    response = httpx.post(
        f"{service.url}/api/v1/studies",
        json=spec,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    study_id: str = response.json()["id"]
    return study_id


@pytest.mark.timeout(900)
def test_a_killed_raylet_under_a_running_study_is_replaced_and_the_study_completes(
    service: ServiceProcess,
) -> None:
    service.start()
    spec = grid_spec()
    study_id = submit(service, spec)
    wait_for(lambda: trials_running(service, study_id), 300, "trials to run", interval=0.2)
    assert service.proc is not None
    matches = [p for p in descendants(service.proc.pid) if "raylet/raylet" in command_line(p)]
    raylets = outermost(matches)  # not a worker the raylet is starting (its command line, still)
    assert len(raylets) == 1, [command_line(p) for p in descendants(service.proc.pid)]
    os.kill(raylets[0], signal.SIGKILL)
    study = wait_until_finished(service, study_id, timeout=600)
    assert study["status"] == "completed", (study["error"], service.log())
    assert study["faults"], "the lost runtime was not noted as a fault"
    health = get(service, "/health")
    assert health["ray"]["state"] == "connected" and health["ray"]["restarts"] == 1, health
    url = f"sqlite:///{service.data_dir / 'ratebench.db'}"
    assert whole(url, study_id, spec) == []
