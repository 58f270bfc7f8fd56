"""`GET /health`: version, database reachability and Ray status, for people and probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel

from service import __version__
from service.api.deps import EngineDep, RayDep
from service.db import database_reachable

router = APIRouter(tags=["health"])


class DatabaseHealth(BaseModel):
    ok: bool
    backend: str
    error: str | None = None


class Health(BaseModel):
    status: str
    version: str
    database: DatabaseHealth
    ray: dict[str, Any]


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(engine: EngineDep, ray: RayDep, response: Response) -> Health:
    """503 when the database cannot be reached; Ray still starting or failed is `degraded`."""
    db_ok, db_error = database_reachable(engine)
    ray_status = ray.status()
    if not db_ok:
        response.status_code = 503
        status = "unavailable"
    elif ray_status.state in {"connected", "disabled"}:
        status = "ok"
    else:
        status = "degraded"
    return Health(
        status=status,
        version=__version__,
        database=DatabaseHealth(ok=db_ok, backend=engine.dialect.name, error=db_error or None),
        ray=ray_status.to_dict(),
    )
