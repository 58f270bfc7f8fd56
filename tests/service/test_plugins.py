"""The example task plugin (examples/plugins/ratebench-friedman, installed with `pip install
--target` into a temporary folder: `plugin_site` in tests/conftest.py) through the service: listed
by the API, the CLI and the web page with its package, version and options; a spec naming it
checked against its options; refused when a Ray node lacks it; and a study on it run through the
REST API and the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.config import Settings
from service.db import session_scope
from service.ray_runtime import RayRuntime
from tests.service.helpers import cli_env, embedded_service, get, ratebench, wait_until_finished

SPEC: dict[str, Any] = {
    "name": "friedman",
    "task": "friedman-gmlp",
    "data": {"batch_size": 100, "n_train": 1000},
    "model": {"hidden": 16, "blocks": 1},
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
    "search_space": {"lr": {"values": [0.001, 0.003]}},  # SGD diverges from 0.01 here
    "budget": {"trials_per_arm": 2, "epochs": 2, "final_seeds": 2},
    "sampler": "grid",
    "pruner": "none",
    "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2},
}


@pytest.fixture
def client(plugin_installed: Path, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'p.db'}", data_dir=tmp_path,
                        run_scheduler=False)  # fmt: skip
    with TestClient(create_app(settings, start_ray=False)) as client:
        with session_scope(client.app.state.engine) as session:  # type: ignore[attr-defined]
            key = create_key(session, "plugins").key
        yield client, {"Authorization": f"Bearer {key}"}


def test_the_api_and_the_page_list_the_plugin_with_its_options(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    http, _ = client
    tasks = {t["name"]: t for t in http.get("/api/v1/tasks").json()}
    gmlp = tasks["friedman-gmlp"]
    assert (gmlp["package"], gmlp["version"], gmlp["kind"]) == (
        "ratebench-friedman",
        "0.1.0",
        "regression",
    )
    assert gmlp["options"][0] == {
        "name": "hidden", "type": "int", "default": 64, "low": 4, "high": 1024, "choices": None,
        "description": "width of the blocks",
    }  # fmt: skip
    assert tasks["mnist1d-mlp"]["package"] == "ratebench"
    page = http.get("/tasks")
    assert page.status_code == 200
    row = page.text.split('id="task-friedman-gmlp"')[1].split("</tr>")[0]
    assert "ratebench-friedman 0.1.0" in row and "mean squared error (val_loss)" in row
    assert "<code>gate</code> str = silu (silu | sigmoid)" in row


def test_a_plugin_spec_is_422_at_each_bad_option_and_nothing_is_stored(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    http, headers = client
    spec = {
        **SPEC,
        "model": {"hidden": 4096, "gate": "tanh"},
        "objective": {"metric": "val_accuracy"},
    }
    response = http.post("/api/v1/studies", json=spec, headers=headers)
    assert response.status_code == 422, response.text
    errors = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
    assert errors == {
        ("body", "objective", "metric"): "friedman-gmlp is a regression task (mean squared "
        "error); its metrics: val_loss",
        ("body", "model", "hidden"): "must be <= 1024, got 4096",
        ("body", "model", "gate"): "must be one of silu, sigmoid, got 'tanh'",
    }
    assert http.get("/api/v1/studies").json()["total"] == 0
    assert http.post("/api/v1/studies", json=SPEC, headers=headers).status_code == 202


@pytest.mark.ray
def test_a_connected_api_refuses_a_plugin_that_a_ray_node_lacks(
    ray_runtime: None, plugin_installed: Path, tmp_path: Path
) -> None:
    """The session's Ray runtime was started without the plugin on its workers' path."""
    from worker.plugin_nodes import cluster_package_problem

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'n.db'}", data_dir=tmp_path,
                        run_scheduler=False)  # fmt: skip
    app = create_app(settings, start_ray=False)
    app.state.ray = RayRuntime(None)
    app.state.ray.start()  # joins the session's runtime, on this (the main) thread
    with TestClient(app) as http:
        with session_scope(app.state.engine) as session:
            key = create_key(session, "nodes").key
        response = http.post("/api/v1/studies", json=SPEC,
                             headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "task"]
        assert error["msg"].startswith("task 'friedman-gmlp': the Ray node 127.0.0.1 (")
        assert error["msg"].endswith(
            "lacks ratebench-friedman, this service ratebench-friedman 0.1.0; install "
            "ratebench-friedman==0.1.0 on every node"
        )
        assert http.get("/api/v1/studies").json()["total"] == 0
    other = cluster_package_problem("ratebench", "0.0.1", "mnist1d-mlp")  # a stale version
    assert other is not None and "has ratebench 0.1.0, this service ratebench 0.0.1" in other


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)  # a service of its own and two studies, on a busy machine
def test_a_plugin_study_runs_through_rest_and_the_cli(
    database_url: str, plugin_site: Path, tmp_path: Path
) -> None:
    """`ratebench serve` with the plugin installed (its folder on the path of the service and,
    through its own Ray runtime, of every trial): one study submitted over REST, one with the
    CLI; both complete, judged by the plugin's regression loss."""
    for service in embedded_service(tmp_path / "data"):
        service.env.update(PYTHONPATH=str(plugin_site), RATEBENCH_DATABASE_URL=database_url)
        service.start()
        key = ratebench("keys", "create", "--name", "plugins", env=service.env).strip()
        env = cli_env(service, key)
        listed = json.loads(ratebench("tasks", "--json", env=env))
        assert {"friedman-gmlp": "ratebench-friedman 0.1.0"}.items() <= {
            t["name"]: f"{t['package']} {t['version']}" for t in listed
        }.items()
        response = httpx.post(f"{service.url}/api/v1/studies", json=SPEC, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert response.status_code == 202, response.text
        by_rest = response.json()["id"]
        spec_file = tmp_path / "friedman.json"
        spec_file.write_text(json.dumps({**copy.deepcopy(SPEC), "name": "friedman-cli"}))
        by_cli = ratebench("submit", str(spec_file), env=env).strip()
        for study_id in (by_rest, by_cli):
            study = wait_until_finished(service, study_id, timeout=600)
            assert study["status"] == "completed", study["error"] or service.log()
            assert study["environment"]["task"] == {
                "name": "friedman-gmlp", "package": "ratebench-friedman", "version": "0.1.0",
            }  # fmt: skip
            board = get(service, f"/studies/{study_id}/leaderboard")
            assert [(a["metric"], a["direction"]) for a in board["arms"]] == [
                ("val_loss", "minimize")
            ] * 2
            assert all(a["objective_mean"] is not None for a in board["arms"])
            trials = get(service, f"/studies/{study_id}/trials?limit=200")["items"]
            final = [t for t in trials if t["role"] == "final" and t["state"] == "COMPLETE"]
            assert len(final) == 4
            assert all(t["user_attrs"]["test_loss"] > 0 for t in final)
            assert all("test_accuracy" not in t["user_attrs"] for t in final)
            history = [r for t in final for r in t["user_attrs"]["history"]]
            assert history and all(r["val_accuracy"] is None for r in history)
        page = httpx.get(f"{service.url}/tasks", timeout=30).text
        assert 'id="task-friedman-gmlp"' in page
        assert os.environ.get("PYTHONPATH") != str(plugin_site)  # the test venv has no plugin
