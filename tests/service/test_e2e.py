"""End to end, as a user: the real service process (SQLite file, in-process Ray), the real CLI,
real training on mnist1d. Submit with an API key, follow to completion, read the leaderboard,
the trials and the plots; then a crash in the middle of a study, and a restart that finishes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    FinishedStudy,
    ServiceProcess,
    cli_env,
    get,
    ratebench,
    tiny_spec,
    wait_for,
    wait_until_finished,
)

pytestmark = pytest.mark.slow


def test_progress_leaderboard_trials_and_plots(finished: FinishedStudy) -> None:
    service, study_id = finished.service, finished.study_id
    arms = finished.study["progress"]["arms"]
    assert set(arms) == {"sgd", "adam"}
    assert all(a["complete"] + a["diverged"] + a["pruned"] == 3 for a in arms.values()), arms

    board = get(service, f"/studies/{study_id}/leaderboard")
    assert {row["arm"] for row in board["arms"]} == {"sgd", "adam"}
    for row in board["arms"]:
        assert row["n_trials"] == 3
        assert row["n_seeds"] == 2
    assert board["arms"][0]["objective_mean"] >= board["arms"][1]["objective_mean"]

    trials = get(service, f"/studies/{study_id}/trials?limit=200")
    assert trials["total"] == 2 * (3 + 2)  # sweep + final seeds per arm
    sweep = [t for t in trials["items"] if t["role"] == "sweep"]
    assert all(t["user_attrs"]["history"] for t in sweep if t["outcome"] == "complete")
    assert all("lr" in t["params"] for t in sweep)

    png = httpx.get(f"{service.url}/api/v1/studies/{study_id}/plots/sensitivity.png", timeout=60)
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    svg = httpx.get(f"{service.url}/api/v1/studies/{study_id}/plots/curves.svg", timeout=60)
    assert b"<svg" in svg.content


def test_cli_reads_status_and_leaderboards(finished: FinishedStudy) -> None:
    table = ratebench("leaderboard", "--task", "mnist1d-mlp", "--json", env=finished.env)
    groups = json.loads(table)["groups"]
    assert [{row["arm"] for row in group["arms"]} for group in groups] == [{"sgd", "adam"}]
    assert "completed" in ratebench("status", finished.study_id, env=finished.env)
    board = ratebench("leaderboard", "--study", finished.study_id, env=finished.env)
    assert "sgd" in board
    assert "adam" in board


def test_a_crashed_service_resumes_its_study_after_restart(
    service: ServiceProcess, tmp_path: Path
) -> None:
    service.start()
    key = ratebench("keys", "create", "--name", "restart", env=service.env).strip()
    spec = tiny_spec("restart", trials=6, epochs=20)  # still running when the service dies
    spec["resources"]["cohort_size"] = 1  # trials finish one by one (cohorts: tests/worker)
    response = httpx.post(
        f"{service.url}/api/v1/studies",
        json=spec,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    study_id = response.json()["id"]

    def some_trials_done() -> bool:
        arms = (get(service, f"/studies/{study_id}")["progress"] or {}).get("arms", {})
        return sum(a.get("complete", 0) + a.get("diverged", 0) for a in arms.values()) >= 1

    wait_for(some_trials_done, timeout=240, what="a finished trial")
    before = {
        (t["arm"], t["number"])
        for t in get(service, f"/studies/{study_id}/trials?limit=200")["items"]
        if t["state"] == "COMPLETE"
    }
    assert get(service, f"/studies/{study_id}")["status"] == "running"
    service.kill()  # SIGKILL: no shutdown hook runs, the lease is left to expire

    service.start()
    study = wait_until_finished(service, study_id)
    assert study["status"] == "completed", study["error"] or service.log()
    assert study["attempts"] == 2
    assert len(study["faults"]) == 1 and "stopped renewing the lease" in study["faults"][0]["error"]
    trials = get(service, f"/studies/{study_id}/trials?limit=200")["items"]
    after = {(t["arm"], t["number"]) for t in trials if t["state"] == "COMPLETE"}
    assert before <= after  # nothing finished before the crash was lost or redone
    for arm in ("sgd", "adam"):
        finished = [
            t for t in trials
            if t["arm"] == arm and t["role"] == "sweep" and t["state"] in {"COMPLETE", "PRUNED"}
        ]  # fmt: skip
        assert len(finished) == 6, (arm, [(t["number"], t["state"]) for t in trials])


def test_cancel_stops_a_running_study_and_keeps_its_results(
    service: ServiceProcess, tmp_path: Path
) -> None:
    service.start()
    key = ratebench("keys", "create", "--name", "cancel", env=service.env).strip()
    spec_file = tmp_path / "long.json"
    # Long enough (80 trials of 2,000 steps, one by one) that no machine finishes it before the
    # cancel lands: in the warm workers of a shared runtime 6 epochs take a fraction of a
    # second, and 80 such trials could end before the `cancel` command has started.
    long = tiny_spec("long", trials=40, epochs=200)
    long["resources"]["cohort_size"] = 1  # a first trial finishes early (cohorts: tests/worker)
    spec_file.write_text(json.dumps(long))
    env = cli_env(service, key)
    study_id = ratebench("submit", str(spec_file), env=env).strip()

    def a_trial_finished() -> bool:
        items = get(service, f"/studies/{study_id}/trials?limit=200")["items"]
        return any(t["state"] == "COMPLETE" for t in items)

    wait_for(a_trial_finished, timeout=240, what="a finished trial")
    assert "running" in ratebench("cancel", study_id, env=env)
    study = wait_until_finished(service, study_id, timeout=60)
    assert study["status"] == "cancelled"
    trials = get(service, f"/studies/{study_id}/trials?limit=200")["items"]
    assert any(t["state"] == "COMPLETE" for t in trials)  # results so far are kept
    sweep = [t for t in trials if t["role"] == "sweep"]
    assert sum(t["state"] == "COMPLETE" for t in sweep) < 2 * 40  # it did stop early
    # what had started and not finished was stopped, and is marked to be re-run on a resume
    stopped = [t for t in sweep if t["state"] == "FAIL"]
    assert all(t["user_attrs"].get("interrupted") for t in stopped), stopped
    waiting = {t["user_attrs"].get("retry_of") for t in sweep if t["state"] == "WAITING"}
    assert waiting <= {t["number"] for t in stopped}  # queued re-runs of stopped trials only
    assert not [t for t in trials if t["state"] == "RUNNING"]
