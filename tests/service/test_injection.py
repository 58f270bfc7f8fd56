"""Hostile input on the smaller paths, each tried for real: HTTP methods as metric labels,
mathtext in study names, deeply nested JSON, Rich markup and escape sequences in the CLI's
output, study names as plot file names, forged export bundles, a revoked key's queue, and the
export's timestamps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.auth import create_key
from service.cli import main
from service.config import Settings
from service.db import get_engine, session_scope
from service.models import StudyRecord
from tests.service.seeded import http_server, seed_finished_study
from tests.service.test_security import SPEC, Api, make_api
from worker.spec import StudySpec, raw_input_problems
from worker.storage import open_storage

HOSTILE_NAMES = ["../../escaped", "/tmp/absolute-name", "..", "a/../../b", "[/]\x1b[2J\x1b]0;x\x07"]


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(sqlite_url, tmp_path)


def test_unknown_http_methods_share_one_metric_label(api: Api) -> None:
    for i in range(20):
        api.client.request(f"X{i}", "/api/v1/health")
    api.client.request("GET", "/api/v1/health")
    lines = api.client.get("/metrics").text.splitlines()
    labels = {
        line.split('method="')[1].split('"')[0]
        for line in lines
        if line.startswith("ratebench_http_requests_total{")
    }
    assert labels == {"other", "GET"}, labels
    assert 'method="other",route="/api/v1/health",status="405"} 20.0' in "\n".join(lines)


@pytest.mark.slow
def test_a_study_name_in_mathtext_is_drawn_as_text(sqlite_url: str, tmp_path: Path) -> None:
    seed_finished_study(sqlite_url, "math", name="$\\frac{1}{$ broken $x^$")
    for api in make_api(sqlite_url, tmp_path):
        for kind in ("sensitivity", "curves"):
            for fmt in ("png", "svg"):
                response = api.client.get(f"/api/v1/studies/math/plots/{kind}.{fmt}")
                assert response.status_code == 200, (kind, fmt, response.text[:300])
        svg = api.client.get("/api/v1/studies/math/plots/curves.svg").text
        assert "broken" in svg  # the title, as written


@pytest.mark.parametrize("depth", [33, 950, 5000, 20_000])
def test_deeply_nested_json_is_422_at_the_body(api: Api, depth: int) -> None:
    body = json.dumps(SPEC)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    response = api.post_raw("alice", body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body"]
    assert "nested deeper than 32 levels" in response.json()["detail"][0]["msg"]
    nested_in_a_string = json.dumps({**SPEC, "name": "[" * 100})  # brackets in text are text
    assert api.post_raw("alice", nested_in_a_string).status_code == 202
    assert api.count() == 1


def test_deep_nesting_reaches_no_recursion(api: Api) -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValidationError) as refused:  # `ratebench run` and `validate` parse here
        StudySpec.model_validate({**SPEC, "x": deep})
    assert "nested deeper than 32 levels" in str(refused.value)
    assert raw_input_problems({"a": deep})[0][1] == "nested deeper than 32 levels"
    nested = "[" * 2000 + "]" * 2000
    for value in (nested, "{" * 2000):
        response = api.client.get("/api/v1/leaderboard", params={"task": "t", "model.width": value})
        assert response.status_code == 404, response.text  # a plain filter value: no such board
        page = api.client.get("/tasks/t", params={"model.width": value})
        assert page.status_code == 404


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real HTTP server in this process, and a key."""
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path)
    app = create_app(settings, start_ray=False)
    with TestClient(app), session_scope(app.state.engine) as session:  # migrated by its start
        key = create_key(session, "cli").key
    with http_server(create_app(settings, start_ray=False)) as url:
        yield url, key


def test_the_cli_prints_hostile_text_as_text(
    served: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, key = served
    ids = []
    for name in HOSTILE_NAMES:
        answer = httpx.post(f"{url}/api/v1/studies", json={**SPEC, "name": name},
                            headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    capsys.readouterr()
    assert main(["list", "--url", url]) == 0
    listed = capsys.readouterr().out
    assert main(["status", ids[-1], "--url", url]) == 0
    status = capsys.readouterr().out
    for out in (listed, status):
        assert "\x1b" not in out and "\x07" not in out  # no escape sequence reaches a terminal
        assert "[/]" in out and "\\x1b[2J" in out  # shown as written, escaped
    assert "../../escaped" in listed


@pytest.mark.slow
def test_plot_files_stay_in_their_folder_whatever_the_study_is_called(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plots" / "here"
    for i, name in enumerate(HOSTILE_NAMES):
        seed_finished_study(sqlite_url, f"s{i}", name=name)
        code = main(["plot", f"s{i}", "--database-url", sqlite_url, "--out", str(out),
                     "--kind", "curves", "--format", "svg"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in tmp_path.rglob("*.svg"))
    assert written == sorted(p.name for p in out.iterdir())  # nothing anywhere else
    assert written == [
        "2J-0-x-curves.svg", "a-..-..-b-curves.svg", "escaped-curves.svg",
        "study-curves.svg", "tmp-absolute-name-curves.svg",
    ]  # fmt: skip
    assert not Path("/tmp/absolute-name-curves.svg").exists()


def _bundle(url: str, tmp_path: Path) -> dict[str, Any]:
    seed_finished_study(url, "forged")
    settings = Settings(database_url=url, data_dir=tmp_path)
    with TestClient(create_app(settings, start_ray=False)) as client:
        bundle: dict[str, Any] = client.get("/api/v1/studies/forged/export").json()
    return bundle


def _renamed(bundle: dict[str, Any], new_id: str) -> dict[str, Any]:
    """The bundle under another id, its Optuna studies renamed to match."""
    text = json.dumps(bundle).replace('"forged/', f'"{new_id}/')
    changed: dict[str, Any] = json.loads(text)
    changed["study"]["id"] = new_id
    return changed


def _import(bundle: dict[str, Any] | str, tmp_path: Path, target: str, capsys: Any) -> str:
    path = tmp_path / "bundle.json"
    path.write_text(bundle if isinstance(bundle, str) else json.dumps(bundle))
    assert main(["import", str(path), "--database-url", target]) == 2
    err: str = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_an_import_refuses_forged_ids_and_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(f"sqlite:///{tmp_path / 'source.db'}", tmp_path)
    target = f"sqlite:///{tmp_path / 'target.db'}"
    seed_finished_study(target, "victim")
    for bad_id in ("../../outside", "victim/sgd", "a/b", ".hidden", "x" * 101, ""):
        err = _import(_renamed(bundle, bad_id), tmp_path, target, capsys)
        assert "not a study id" in err, err
    storage = open_storage(target)  # an Optuna study left under an id whose row is gone
    try:
        optuna.create_study(storage=storage, study_name="orphan/sgd")
    finally:
        storage.engine.dispose()
    err = _import(_renamed(bundle, "orphan"), tmp_path, target, capsys)
    assert "Optuna study 'orphan/sgd' already exists" in err
    rows = [
        ({"arm": "nope"}, "arm_results[0].arm: 'nope' is not an arm"),
        ({"scheme": "adam"}, "arm_results[0].scheme: 'adam', but the study's spec says 'sgd'"),
        ({"metric": "val_loss"}, "arm_results[0].metric"),
        ({"best_lr": "0.1"}, "arm_results[0].best_lr: must be a finite number or null"),
        ({"rank": -1}, "arm_results[0].rank: must be a whole number"),
        ({"summary": []}, "arm_results[0].summary: must be an object"),
    ]
    for change, message in rows:
        forged = json.loads(json.dumps(bundle))
        forged["arm_results"][0].update(change)
        assert message in _import(forged, tmp_path, target, capsys)
    long_name = {**bundle, "study": {**bundle["study"], "name": "n" * 201}}
    assert "study.name: must be text of 1 to 200" in _import(long_name, tmp_path, target, capsys)
    deep = json.dumps(bundle)[:-1] + ', "extra": ' + "[" * 3000 + "]" * 3000 + "}"
    assert "nests deeper" in _import(deep, tmp_path, target, capsys)
    engine = get_engine(target)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(StudyRecord)).scalar() == 1


def test_revoking_a_key_cancels_its_queued_studies_and_says_so(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for api in make_api(sqlite_url, tmp_path):
        queued = [api.submit("alice").json()["id"] for _ in range(2)]
        other = api.submit("bob").json()["id"]
        running = api.submit("alice").json()["id"]
        with api.engine.begin() as conn:  # alice's third study is running
            conn.execute(StudyRecord.__table__.update().where(StudyRecord.id == running)
                         .values(status="running"))  # fmt: skip
        with session_scope(api.engine) as session:
            alice = session.scalars(sa.select(StudyRecord.api_key_id).where(
                StudyRecord.id == queued[0])).one()  # fmt: skip
        assert main(["keys", "revoke", str(alice), "--database-url", sqlite_url]) == 0
        out = capsys.readouterr().out
        assert f"revoked key {alice}" in out and "cancelled 2 queued studies" in out
        assert all(study_id in out for study_id in queued)
        assert "1 running studies go on" in out and running in out
        states = {
            study_id: api.client.get(f"/api/v1/studies/{study_id}").json()
            for study_id in (*queued, other)
        }
        assert [states[i]["status"] for i in queued] == ["cancelled", "cancelled"]
        assert "revoked" in states[queued[0]]["error"]
        assert states[other]["status"] == "queued"  # another key's queue is untouched
        assert api.submit("alice").status_code == 401


def test_export_timestamps_carry_their_offset(tmp_path: Path) -> None:
    bundle = _bundle(f"sqlite:///{tmp_path / 'source.db'}", tmp_path)
    times = [
        t[name]
        for s in bundle["trials"]
        for t in s["trials"]
        for name in ("datetime_start", "datetime_complete")
        if t[name] is not None
    ]
    times += [bundle["study"][name] for name in ("created_at", "started_at", "finished_at")]
    assert times and all(datetime.fromisoformat(t).tzinfo is not None for t in times), times
