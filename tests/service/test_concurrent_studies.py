"""Several studies at once, for real: a service (SQLite, real Ray, real training) with
RATEBENCH_MAX_RUNNING_STUDIES=2. A long study that wants more trials than the cluster has is
submitted first; a short study of another key, submitted after it, still runs and completes
while the long one is running, because the running studies share the trial slots round-robin.
The per-key limit holds beside it: a second study of the long study's key stays queued.
Cancelling the long study stops it alone; each study was claimed once."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.service.helpers import (
    ServiceProcess,
    get,
    ratebench,
    tiny_spec,
    wait_for,
    wait_until_finished,
)

pytestmark = pytest.mark.slow

FINISHED = {"completed", "completed_with_errors", "failed", "cancelled"}


def long_spec(slots: int) -> dict[str, Any]:
    """A thousand short trials, twice as many at a time as the cluster has slots."""
    spec = tiny_spec("long", trials=1000, epochs=20)
    spec["arms"] = [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}]
    spec["resources"] = {  # one trial per task: the test counts running trials against slots
        "cpus_per_trial": 0.5,
        "max_concurrent_trials": min(2 * slots, 256),
        "cohort_size": 1,
    }
    return spec


def submit(service: ServiceProcess, key: str, spec: dict[str, Any]) -> str:
    response = httpx.post(
        f"{service.url}/api/v1/studies",
        json=spec,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    study_id: str = response.json()["id"]
    return study_id


def cancel(service: ServiceProcess, key: str, study_id: str) -> None:
    response = httpx.post(
        f"{service.url}/api/v1/studies/{study_id}/cancel",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code < 300, response.text


def trials_running(study: dict[str, Any]) -> int:
    arms = (study.get("progress") or {}).get("arms") or {}
    return sum(arm["running"] for arm in arms.values())


def test_a_short_study_completes_while_a_long_one_runs(service: ServiceProcess) -> None:
    service.env["RATEBENCH_MAX_RUNNING_STUDIES"] = "2"
    service.env["RATEBENCH_MAX_RUNNING_PER_KEY"] = "1"
    health = service.start()
    slots = int(health["ray"]["resources"]["CPU"] / 0.5)  # trials of 0.5 CPU the cluster holds
    key_a = ratebench("keys", "create", "--name", "a", env=service.env).strip()
    key_b = ratebench("keys", "create", "--name", "b", env=service.env).strip()

    long_id = submit(service, key_a, long_spec(slots))
    wait_for(  # the long study holds the cluster before the others arrive
        lambda: trials_running(get(service, f"/studies/{long_id}")) > 0,
        120,
        "the long study's trials to run",
    )
    same_key_id = submit(service, key_a, tiny_spec("same-key", trials=1))
    short_id = submit(service, key_b, tiny_spec("short", trials=1))

    def short_finished() -> tuple[dict[str, Any], ...] | None:
        studies = {i: get(service, f"/studies/{i}") for i in (short_id, long_id, same_key_id)}
        running = [i for i, s in studies.items() if s["status"] == "running"]
        assert len(running) <= 2, running  # RATEBENCH_MAX_RUNNING_STUDIES
        assert studies[same_key_id]["status"] == "queued"  # RATEBENCH_MAX_RUNNING_PER_KEY
        # The gate holds the long study to the cluster's slots (and one trial in line), not
        # to its own max_concurrent_trials: the short study gets the slots that free up.
        assert trials_running(studies[long_id]) <= slots + 1, studies[long_id]["progress"]
        if studies[short_id]["status"] in FINISHED:
            return studies[short_id], studies[long_id]
        return None

    short, long = wait_for(short_finished, 180, "the short study to finish", 0.25)
    assert short["status"] == "completed", short["error"] or service.log()
    assert long["status"] == "running", long  # read as soon as the short one was seen done
    assert long["progress"]["trials_done"] < long["progress"]["trials_total"]

    cancel(service, key_a, same_key_id)  # still queued: cancelled at once
    assert get(service, f"/studies/{same_key_id}")["status"] == "cancelled"
    cancel(service, key_a, long_id)
    long = wait_until_finished(service, long_id, timeout=60)
    assert long["status"] == "cancelled"
    assert get(service, f"/studies/{short_id}")["status"] == "completed"  # untouched
    assert (short["attempts"], long["attempts"]) == (1, 1)
    board = get(service, f"/studies/{short_id}/leaderboard")
    assert {row["arm"] for row in board["arms"]} == {"sgd", "adam"}
