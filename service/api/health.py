"""`GET /health`: version, database reachability and Ray status, for people and probes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from service import __version__
from service.api.deps import EngineDep, RayDep, in_thread
from service.db import database_reachable
from service.ray_runtime import RayRuntime, RayStatus

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
async def health(engine: EngineDep, ray: RayDep, request: Request, response: Response) -> Health:
    """503 when the database cannot be reached; Ray still starting or failed is `degraded`.
    Its checks run in threads of their own, so a busy API still answers its probes."""
    db_ok, db_error, ray_status = await in_thread(request, "health", _check, engine, ray)
    if not db_ok:
        response.status_code = 503
        response.headers["Retry-After"] = "5"
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


def _check(engine: sa.Engine, ray: RayRuntime) -> tuple[bool, str, RayStatus]:
    db_ok, db_error = database_reachable(engine)
    return db_ok, db_error, ray.status()
