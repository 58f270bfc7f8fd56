"""The REST API on real databases (SQLite file and PostgreSQL), without Ray: auth, validation,
idempotency, the queue's HTTP face, catalog and leaderboards computed from stored rows."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key, revoke_key
from service.config import Settings
from service.db import session_scope
from service.models import ArmResult, StudyRecord

SPEC: dict[str, Any] = {
    "name": "api-test",
    "task": "mnist1d-mlp",
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
    "search_space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}},
    "budget": {"trials_per_arm": 4, "epochs": 2, "final_seeds": 2},
}


@pytest.fixture
def app_and_key(database_url: str, tmp_path: Any) -> Iterator[tuple[TestClient, str]]:
    settings = Settings(database_url=database_url, data_dir=tmp_path, anonymous_reads=True)
    app = create_app(settings, start_ray=False)
    with TestClient(app) as client:
        with session_scope(app.state.engine) as session:
            key = create_key(session, "tests").key
        yield client, key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def count_studies(client: TestClient) -> int:
    engine: sa.Engine = client.app.state.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(StudyRecord)).scalar_one())


def test_submit_returns_202_location_and_the_study_is_queued(
    app_and_key: tuple[TestClient, str],
) -> None:
    client, key = app_and_key
    response = client.post("/api/v1/studies", json=SPEC, headers=auth(key))
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == f"/api/v1/studies/{body['id']}"
    study = client.get(response.headers["Location"]).json()
    assert study["status"] == "queued"
    assert study["task"] == "mnist1d-mlp"
    assert [a["label"] for a in study["spec"]["arms"]] == ["sgd", "adam"]


def test_idempotency_key_never_creates_a_second_study(app_and_key: tuple[TestClient, str]) -> None:
    client, key = app_and_key
    headers = {**auth(key), "Idempotency-Key": "retry-123"}
    first = client.post("/api/v1/studies", json=SPEC, headers=headers)
    second = client.post("/api/v1/studies", json=SPEC, headers=headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["created"] is False
    assert count_studies(client) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer rb_not-a-key"}, {"Authorization": "Basic abc"}],
    ids=["missing", "unknown", "wrong-scheme"],
)
def test_writes_without_a_valid_key_get_401(
    app_and_key: tuple[TestClient, str], headers: dict[str, str]
) -> None:
    client, _ = app_and_key
    assert client.post("/api/v1/studies", json=SPEC, headers=headers).status_code == 401
    # cancelling a study that does not exist answers the same 401: nothing leaks
    missing = client.post("/api/v1/studies/doesnotexist/cancel", headers=headers)
    assert missing.status_code == 401
    assert count_studies(client) == 0


def test_a_revoked_key_is_refused(app_and_key: tuple[TestClient, str]) -> None:
    client, key = app_and_key
    with session_scope(client.app.state.engine) as session:  # type: ignore[attr-defined]
        revoke_key(session, 1)
    assert client.post("/api/v1/studies", json=SPEC, headers=auth(key)).status_code == 401


def test_reads_can_require_a_key(database_url: str, tmp_path: Any) -> None:
    settings = Settings(database_url=database_url, data_dir=tmp_path, anonymous_reads=False)
    with TestClient(create_app(settings, start_ray=False)) as client:
        assert client.get("/api/v1/studies").status_code == 401
        assert client.get("/api/v1/studies/nope").status_code == 401  # not 404
        assert client.get("/api/v1/health").status_code == 200  # probes stay open


def mutate(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    target: Any = spec
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[int(last) if last.isdigit() else last] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "loc", "words"),
    [
        (mutate("arms.1.optimizer", "foo"), ["body", "arms", 1, "optimizer"], "unknown scheme"),
        (mutate("task", "imagenet-vit"), ["body", "task"], "unknown task"),
        (mutate("search_space.lr.high", 1e6), ["body", "search_space", "lr"], "<= 100"),
        (mutate("budget.trials_per_arm", 10**6), ["body", "budget", "trials_per_arm"], "1000"),
        (mutate("arms.0.fixed.momentum", 3.0), ["body", "arms", 0, "fixed", "momentum"], "0.999"),
        (
            mutate("arms.1.schedule", {"name": "cosine", "warmup": 2}),
            ["body", "arms", 1, "schedule", "warmup"],
            "give warmup_epochs for epochs",
        ),
        (
            {
                **mutate("arms.1.schedule", {"name": "step", "milestones": [0.5]}),
                "search_space": {"schedule.floor": {"values": [0]}},
            },
            ["body", "search_space", "schedule.floor"],
            "cosine and linear schedules take floor",
        ),
    ],
    ids=["scheme", "task", "rate-range", "budget", "fixed-range", "schedule", "swept-schedule"],
)
def test_invalid_specs_get_422_naming_the_field_and_write_nothing(
    app_and_key: tuple[TestClient, str], spec: dict[str, Any], loc: list[Any], words: str
) -> None:
    client, key = app_and_key
    response = client.post("/api/v1/studies", json=spec, headers=auth(key))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    matching = [e for e in errors if e["loc"][: len(loc)] == loc]
    assert matching, errors
    assert any(words in e["msg"] for e in matching), matching
    assert count_studies(client) == 0


def test_malformed_json_and_oversized_bodies_are_refused(
    app_and_key: tuple[TestClient, str],
) -> None:
    client, key = app_and_key
    headers = {**auth(key), "Content-Type": "application/json"}
    malformed = client.post("/api/v1/studies", content=b'{"name": ', headers=headers)
    assert malformed.status_code == 422
    assert "JSON" in malformed.text
    huge = {**SPEC, "name": "x" * 100_000}
    assert client.post("/api/v1/studies", json=huge, headers=auth(key)).status_code == 413
    assert count_studies(client) == 0


def test_list_filters_paginates_and_cancel_queued(app_and_key: tuple[TestClient, str]) -> None:
    client, key = app_and_key
    ids = [
        client.post("/api/v1/studies", json={**SPEC, "name": f"s{i}"}, headers=auth(key)).json()[
            "id"
        ]
        for i in range(3)
    ]
    page = client.get("/api/v1/studies", params={"limit": 2}).json()
    assert page["total"] == 3
    assert [s["name"] for s in page["items"]] == ["s2", "s1"]  # newest first
    cancelled = client.post(f"/api/v1/studies/{ids[0]}/cancel", headers=auth(key))
    assert cancelled.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/studies/{ids[0]}/cancel", headers=auth(key)).status_code == 409
    queued = client.get("/api/v1/studies", params={"status": "queued"}).json()
    assert {s["id"] for s in queued["items"]} == set(ids[1:])
    assert client.get("/api/v1/studies", params={"task": "digits-mlp"}).json()["total"] == 0
    assert client.get("/api/v1/studies/nope").status_code == 404


def test_catalog_lists_registries(app_and_key: tuple[TestClient, str]) -> None:
    client, _ = app_and_key
    schemes = {s["name"]: s for s in client.get("/api/v1/schemes").json()}
    assert {"sgd", "adam", "adamw"} <= set(schemes)
    lr = next(h for h in schemes["sgd"]["hyperparameters"] if h["name"] == "lr")
    assert lr["log"] is True
    tasks = {t["name"] for t in client.get("/api/v1/tasks").json()}
    assert {"mnist1d-mlp", "digits-mlp"} <= tasks


def _finished_study(engine: sa.Engine, name: str, arms: dict[str, tuple[float, float]]) -> str:
    """A completed study with stored arm rows {arm: (objective_mean, best_lr)}."""
    with session_scope(engine) as session:
        study = StudyRecord(id=name, name=name, task="mnist1d-mlp", spec=SPEC, status="completed")
        session.add(study)
        for rank, (arm, (mean, lr)) in enumerate(arms.items(), start=1):
            session.add(
                ArmResult(
                    study_id=name, task="mnist1d-mlp", arm=arm, scheme=arm, metric="val_accuracy",
                    direction="maximize", rank=rank, best_lr=lr, objective_mean=mean,
                    n_trials=4, n_diverged=1, summary={"final_values": [mean, mean]},
                )
            )  # fmt: skip
    return name


def test_task_leaderboard_aggregates_finished_studies(
    app_and_key: tuple[TestClient, str],
) -> None:
    client, _ = app_and_key
    engine = client.app.state.engine  # type: ignore[attr-defined]
    _finished_study(engine, "a", {"sgd": (0.80, 0.1), "adam": (0.70, 0.001)})
    _finished_study(engine, "b", {"sgd": (0.60, 0.3), "adam": (0.75, 0.002)})
    board = client.get("/api/v1/leaderboard", params={"task": "mnist1d-mlp"}).json()
    (group,) = board["groups"]  # one setting: both studies pooled
    rows = {r["arm"]: r for r in group["arms"]}
    assert [r["arm"] for r in group["arms"]] == ["adam", "sgd"]  # 0.725 > 0.70
    assert rows["sgd"]["objective_mean"] == pytest.approx(0.70)
    assert rows["sgd"]["objective_best"] == pytest.approx(0.80)
    assert rows["sgd"]["best_lr"] == pytest.approx(0.1)  # the rate of its best study
    assert rows["adam"]["best_lr"] == pytest.approx(0.002)
    assert rows["sgd"]["n_trials"] == 8
    assert rows["sgd"]["n_diverged"] == 2
    assert rows["sgd"]["studies"] == ["a", "b"]
    assert rows["sgd"]["n_seeds"] == 4
    study_board = client.get("/api/v1/studies/a/leaderboard").json()
    assert [r["arm"] for r in study_board["arms"]] == ["sgd", "adam"]
    missing = client.get("/api/v1/leaderboard", params={"task": "digits-mlp"})
    assert missing.status_code == 404
    profile = client.get("/api/v1/leaderboard/profile").json()
    assert profile["schemes"]["adam"][0] == 1.0  # adam is best on the only task
    assert profile["schemes"]["sgd"][0] == 0.0
