"""Who reads what, on real databases: with private studies a key reads its own and the public
ones (404 for the rest, as for none), anonymous readers the public ones; whoever does not own
a study never sees its data folder, host names or addresses; and the answers that rebuild a
whole study (CSV, export, the profile plot) are built once per state, not per request."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.cli import main
from service.config import Settings
from service.db import session_scope
from service.models import ArmResult, StudyRecord
from service.privacy import HIDDEN
from tests.service.seeded import NODE, http_server, seed_finished_study
from tests.service.test_security import SPEC, Api, make_api

CIFAR = {**SPEC, "task": "cifar10-cnn", "data": {"data_dir": "cifar-10-batches-py"}}


def _key_id(api: Api, who: str) -> int:
    from service.auth import verify_key

    with session_scope(api.engine) as session:
        key = verify_key(session, api.keys[who])
        assert key is not None
        return key.id


@pytest.fixture
def private(database_url: str, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(database_url, tmp_path, private_studies=True)


def _ids(api: Api, who: str | None) -> set[str]:
    headers = api.headers(who) if who else {}
    page = api.client.get("/api/v1/studies", headers=headers).json()
    return {item["id"] for item in page["items"]}


def test_with_private_studies_a_key_reads_its_own_and_the_public_ones(private: Api) -> None:
    api = private
    mine = api.submit("alice").json()["id"]
    shared = api.client.post(
        "/api/v1/studies?public=true", json={**SPEC, "name": "shared"}, headers=api.headers("alice")
    ).json()["id"]
    assert _ids(api, "alice") == {mine, shared}
    assert _ids(api, "bob") == {shared}
    assert _ids(api, None) == {shared}  # anonymous reads: the public ones
    assert _ids(api, "admin") == {mine, shared}
    for path in ("", "/trials", "/trials.csv", "/leaderboard", "/export", "/plots/curves.svg"):
        for headers in (api.headers("bob"), {}):
            response = api.client.get(f"/api/v1/studies/{mine}{path}", headers=headers)
            assert response.status_code == 404, (path, response.text)  # as for no study
            assert response.json()["detail"] == f"no study {mine!r}"
        own = api.client.get(f"/api/v1/studies/{mine}{path}", headers=api.headers("alice"))
        assert own.status_code == 200, (path, own.text)
    assert api.client.get(f"/studies/{mine}").status_code == 404  # the web page too
    # only its owner (or an admin) decides
    refused = api.client.post(
        f"/api/v1/studies/{mine}/visibility?public=true", headers=api.headers("bob")
    )
    assert refused.status_code == 404  # bob cannot even see it
    made_public = api.client.post(
        f"/api/v1/studies/{mine}/visibility?public=true", headers=api.headers("alice")
    )
    assert made_public.status_code == 200 and made_public.json()["public"] is True
    assert _ids(api, "bob") == {mine, shared}
    not_his = api.client.post(
        f"/api/v1/studies/{mine}/visibility?public=false", headers=api.headers("bob")
    )
    assert not_his.status_code == 403
    assert (
        api.client.get("/api/v1/studies", headers={"Authorization": "Bearer rb_x"}).status_code
        == 401
    )


def test_task_leaderboards_pool_only_the_studies_a_reader_may_read(
    private: Api, database_url: str
) -> None:
    api = private
    seed_finished_study(database_url, "alices", api_key_id=_key_id(api, "alice"))
    board = api.client.get("/api/v1/leaderboard?task=mnist1d-mlp", headers=api.headers("alice"))
    assert board.status_code == 200 and board.json()["groups"][0]["studies"] == ["alices"]
    hidden = api.client.get("/api/v1/leaderboard?task=mnist1d-mlp", headers=api.headers("bob"))
    assert hidden.status_code == 404
    profile = api.client.get("/api/v1/leaderboard/profile").json()
    assert profile["tasks"] == {}
    assert "alices" not in api.client.get("/").text


def test_where_a_study_ran_is_shown_to_its_owner_and_admins_only(
    database_url: str, tmp_path: Path
) -> None:
    for api in make_api(database_url, tmp_path):  # studies readable by all (the default)
        seed_finished_study(database_url, "ran", api_key_id=_key_id(api, "alice"), on_node=True)
        api.client.post("/api/v1/studies", json=CIFAR, headers=api.headers("alice"))
        with api.engine.begin() as conn:  # a CIFAR study, with its data folder
            conn.execute(StudyRecord.__table__.update().values(
                spec={**CIFAR, "data": {"data_dir": "/srv/secret/cifar"}}
            ).where(StudyRecord.id == "ran"))  # fmt: skip
        for who, sees in (("alice", True), ("admin", True), ("bob", False), (None, False)):
            headers = api.headers(who) if who else {}
            study = api.client.get("/api/v1/studies/ran", headers=headers).json()
            assert (study["spec"]["data"]["data_dir"] != HIDDEN) is sees, who
            environment = study["environment"]
            assert ("hostname" in environment) is sees, who
            assert ("ip" in environment["nodes"][0]) is sees, who
            assert environment["nodes"][0]["cpu"] == NODE["cpu"]  # what it ran on stays
            trial = api.client.get("/api/v1/studies/ran/trials", headers=headers).json()["items"][0]
            assert ("host" in trial["user_attrs"]) is sees and ("ip" in trial["node"]) is sees
            rows = _csv(api.client.get("/api/v1/studies/ran/trials.csv", headers=headers).text)
            assert (NODE["hostname"] in rows[0]["node"]) is sees, who
            bundle = api.client.get("/api/v1/studies/ran/export", headers=headers).text
            assert (NODE["ip"] in bundle) is sees and ("/srv/secret" in bundle) is sees, who
            listed = api.client.get("/api/v1/studies", headers=headers).json()["items"]
            assert all(("hostname" in (s["environment"] or {})) is sees for s in listed[-1:])
            page = api.client.get("/studies/ran", headers=headers).text
            assert (NODE["ip"] in page) is sees, who


def _csv(text: str) -> list[dict[str, Any]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_whole_study_answers_are_built_once_per_state(sqlite_url: str, tmp_path: Path) -> None:
    for api in make_api(sqlite_url, tmp_path):
        seed_finished_study(sqlite_url, "cached")
        for path in ("/studies/cached/trials.csv", "/studies/cached/export",
                     "/leaderboard/profile.svg"):  # fmt: skip
            first = api.client.get(f"/api/v1{path}")
            again = api.client.get(f"/api/v1{path}")
            assert first.status_code == again.status_code == 200, first.text
            assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit"), path
            assert first.content == again.content
        # the profile is keyed by what it draws: a re-run of the same study draws nothing new
        # (its seeds count once), other results draw it again
        seed_finished_study(sqlite_url, "second")
        assert api.client.get("/api/v1/leaderboard/profile.svg").headers["X-Cache"] == "hit"
        other = {"final_values": [0.99] * 3, "final_seeds": [11, 12, 13]}  # other seeds
        with api.engine.begin() as conn:
            summary = conn.execute(
                sa.select(ArmResult.summary).where(
                    ArmResult.study_id == "second", ArmResult.arm == "adam"
                )
            ).scalar_one()
            conn.execute(
                ArmResult.__table__.update()
                .where(ArmResult.study_id == "second", ArmResult.arm == "adam")
                .values(summary={**summary, **other})
            )
        assert api.client.get("/api/v1/leaderboard/profile.svg").headers["X-Cache"] == "miss"


def test_the_cli_submits_public_studies_and_changes_their_visibility(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, private_studies=True)
    app = create_app(settings, start_ray=False)
    with TestClient(app), session_scope(app.state.engine) as session:  # migrated by its start
        alice, bob = create_key(session, "alice").key, create_key(session, "bob").key
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    with http_server(create_app(settings, start_ray=False)) as url:
        assert main(["submit", str(spec), "--public", "--url", url, "--key", alice]) == 0
        study_id = capsys.readouterr().out.strip()
        as_bob = {"Authorization": f"Bearer {bob}"}
        seen = httpx.get(f"{url}/api/v1/studies/{study_id}", headers=as_bob)
        assert seen.status_code == 200 and seen.json()["public"] is True
        assert main(["visibility", study_id, "private", "--url", url, "--key", alice]) == 0
        assert capsys.readouterr().out.strip() == f"{study_id} private"
        assert httpx.get(f"{url}/api/v1/studies/{study_id}").status_code == 404
