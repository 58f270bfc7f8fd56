"""`GET /api/v1/health` through the real app, on real databases."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


def test_health_reports_version_database_and_ray(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url), start_ray=False)
    with TestClient(app) as client:
        response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["version"]
    assert body["database"]["ok"] is True
    assert body["database"]["backend"] in {"sqlite", "postgresql"}
    assert body["ray"]["state"] == "disabled"


def test_health_is_503_when_the_database_is_unreachable(sqlite_url: str) -> None:
    app = create_app(Settings(database_url=sqlite_url), start_ray=False)
    with TestClient(app) as client:
        app.state.engine = create_app(
            Settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none"), start_ray=False
        ).state.engine
        response = client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"]["ok"] is False
    assert body["database"]["error"]
