"""The OpenAPI document declares the bearer scheme (so /docs offers to authorize) and which
operations need a key: writes always, reads only when anonymous reads are off, probes never."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


def openapi(sqlite_url: str, tmp_path: Path, anonymous_reads: bool) -> dict[str, Any]:
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path, anonymous_reads=anonymous_reads)
    with TestClient(create_app(settings, start_ray=False)) as client:
        document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def security(document: dict[str, Any], method: str, path: str) -> Any:
    return document["paths"][path][method].get("security")


@pytest.mark.parametrize("anonymous_reads", [True, False], ids=["open-reads", "keyed-reads"])
def test_writes_declare_the_bearer_scheme_and_probes_do_not(
    sqlite_url: str, tmp_path: Path, anonymous_reads: bool
) -> None:
    document = openapi(sqlite_url, tmp_path, anonymous_reads)
    schemes = document["components"]["securitySchemes"]
    assert list(schemes) == ["BearerAuth"]
    assert schemes["BearerAuth"]["type"] == "http"
    assert schemes["BearerAuth"]["scheme"] == "bearer"
    needs_key: list[dict[str, list[str]]] = [{"BearerAuth": []}]
    assert security(document, "post", "/api/v1/studies") == needs_key
    assert security(document, "post", "/api/v1/studies/{study_id}/cancel") == needs_key
    assert security(document, "get", "/api/v1/health") is None
    reads = security(document, "get", "/api/v1/studies/{study_id}")
    assert reads == (None if anonymous_reads else needs_key)
    assert "/metrics" not in document["paths"]
