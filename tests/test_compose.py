"""docker-compose.yml cannot run here (no Docker engine), so check what it declares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_declares_the_four_roles(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "ray-head", "api", "ray-worker"}


def test_every_built_service_uses_a_dockerfile_that_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        else:
            assert "image" in service, name
    assert compose["services"]["api"]["image"] == compose["services"]["ray-head"]["image"]


def test_postgres_has_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "pgdata" in compose["volumes"]


def test_ratebench_services_point_at_postgres_and_the_ray_head(compose: dict[str, Any]) -> None:
    for name in ("api", "ray-head", "ray-worker"):
        env = compose["services"][name]["environment"]
        assert env["RATEBENCH_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["RATEBENCH_DATABASE_URL"], name
        assert env["RAY_AUTH_MODE"] == "token", name
    assert compose["services"]["api"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert compose["services"]["ray-worker"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert "--address=ray-head:6379" in compose["services"]["ray-worker"]["command"]


def test_api_port_healthcheck_and_dependencies(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert "8000:8000" in api["ports"]
    assert "/api/v1/health" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api["environment"]["RATEBENCH_RUN_SCHEDULER"] == "false"
    assert "ratebench scheduler" in compose["services"]["ray-head"]["command"]


def test_ray_worker_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
