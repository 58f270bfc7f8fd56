"""Submit refuses a trial larger than any Ray node with a 422 when the API is connected to Ray
(as it is when it runs the scheduler); an API that is not connected cannot tell and accepts it (the
scheduler's own check then fails the study). The session's runtime is one node of 2 CPUs and
no GPU (tests/conftest.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.config import Settings
from service.db import session_scope
from service.ray_runtime import RayRuntime
from tests.service.test_api import SPEC


def _submit(client: TestClient, key: str, resources: dict[str, Any]) -> Any:
    spec = copy.deepcopy(SPEC)
    spec["resources"] = resources
    return client.post("/api/v1/studies", json=spec, headers={"Authorization": f"Bearer {key}"})


def _client(tmp_path: Path, connected: bool) -> TestClient:
    """The app, without a scheduler (nothing runs what it accepts); `connected`: its Ray
    runtime joined here, on the main thread, as `ratebench serve` joins before serving (a
    TestClient runs the app's start-up in another thread, where Ray must not be joined)."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fit.db'}", data_dir=tmp_path, run_scheduler=False
    )
    app = create_app(settings, start_ray=False)
    if connected:
        app.state.ray = RayRuntime(None)
        app.state.ray.start()
        assert app.state.ray.connected
    return TestClient(app)


def test_a_connected_api_refuses_a_trial_no_node_can_hold(
    ray_runtime: None, tmp_path: Path
) -> None:
    with _client(tmp_path, connected=True) as client:
        with session_scope(client.app.state.engine) as session:  # type: ignore[attr-defined]
            key = create_key(session, "fit").key
        cpus = _submit(client, key, {"cpus_per_trial": 3})
        assert cpus.status_code == 422, cpus.text
        (error,) = cpus.json()["detail"]
        assert error["loc"] == ["body", "resources", "cpus_per_trial"]
        assert error["msg"].startswith(
            "resources.cpus_per_trial: 3 but the largest Ray node has 2 CPUs"
        )
        gpus = _submit(client, key, {"cpus_per_trial": 1, "gpus_per_trial": 1})
        assert gpus.status_code == 422, gpus.text
        (error,) = gpus.json()["detail"]
        assert error["loc"] == ["body", "resources", "gpus_per_trial"]
        assert "largest Ray node has 0 GPUs" in error["msg"]
        assert client.get("/api/v1/studies").json()["total"] == 0


def test_an_api_without_ray_accepts_it_for_the_scheduler_to_check(tmp_path: Path) -> None:
    with _client(tmp_path, connected=False) as client:
        with session_scope(client.app.state.engine) as session:  # type: ignore[attr-defined]
            key = create_key(session, "fit").key
        assert _submit(client, key, {"cpus_per_trial": 64}).status_code == 202
