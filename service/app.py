"""The FastAPI application factory and its lifespan.

At start-up: migrate the database, connect to Ray (on the main thread, `RayRuntime`), and
(unless disabled) start the study scheduler, which asks the same runtime to start Ray again
when its node dies. Routes live in `service/api/`, one router per resource.

While the database cannot be reached (server down or restarting, no free connection within
`db_pool_timeout`, SQLite lock not granted), every endpoint answers 503 with `Retry-After`,
never a 500: the client should retry, and nothing it sent was half stored.

`GET /metrics` serves Prometheus metrics (`service.metrics`), counted per app.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.staticfiles import StaticFiles
from optuna.exceptions import StorageInternalError

from service import __version__
from service.api import catalog, export, health, leaderboard, metrics, plots, studies
from service.api.auth import BEARER
from service.api.deps import read_db, set_up_limiters, uses_dependency
from service.config import Settings, get_settings
from service.db import get_engine, is_unavailable, migrate
from service.errors import install_error_handlers
from service.limits import BodySizeLimit, JsonDepthLimit, NoNulInUrl
from service.metrics import AppMetrics, LeaseCounters, RequestMetrics
from service.ray_runtime import RayRuntime
from service.scheduler import Scheduler, SchedulerConfig
from service.web import pages
from worker import footprint
from worker.spec import warm_up_checks
from worker.tasks import DataRoots

__all__ = ["RETRY_AFTER_SECONDS", "create_app", "scheduler_config"]

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"
RETRY_AFTER_SECONDS = 5
# Errors that may mean "the database is unavailable"; `is_unavailable` decides for each one.
_MAYBE_UNAVAILABLE = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    sa.exc.DBAPIError,
    StorageInternalError,
)


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """503 for an unreachable database; any other database error stays a logged 500."""
    if not is_unavailable(exc):
        raise exc
    log.warning("database unavailable: %s", str(exc).splitlines()[0])
    return JSONResponse(
        status_code=503,
        content={
            "detail": "the database is unavailable (down, restarting or overloaded); "
            f"nothing was changed: retry in {RETRY_AFTER_SECONDS} s"
        },
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def scheduler_config(settings: Settings, url: str) -> SchedulerConfig:
    """The scheduler's settings, as `ratebench serve` and `ratebench scheduler` both run it."""
    return SchedulerConfig(
        storage_url=url,
        ray_address=settings.ray_address,
        lease_seconds=settings.lease_seconds,
        max_running_per_key=settings.max_running_per_key,
        max_running_studies=settings.max_running_studies,
        max_attempts=settings.max_attempts,
    )


def create_app(settings: Settings | None = None, *, start_ray: bool = True) -> FastAPI:
    """Build the app; `start_ray=False` serves the API without Ray and without the scheduler
    (tests of the HTTP surface)."""
    settings = settings or get_settings()
    url = settings.resolved_database_url()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(url)
        DataRoots.use(settings.allowed_data_roots())  # what validating a spec may read
        warm_up_checks()  # the first submit then answers in milliseconds, not seconds
        # PyTorch's meta kernels for the step estimate (`worker.footprint`), while it serves
        warming = threading.Thread(target=footprint.warm_up, name="warm-up", daemon=True)
        warming.start()
        set_up_limiters(app, settings)
        app.state.ray.start()  # on the main thread (`RayRuntime`): Ray must not start elsewhere
        scheduler = None
        if settings.run_scheduler and app.state.ray.connected:
            scheduler = Scheduler(
                app.state.engine,
                scheduler_config(settings, url),
                ray=app.state.ray,
            )
            app.state.scheduler = scheduler
            scheduler.start_in_thread()
        yield
        if scheduler is not None:
            scheduler.stop()
        app.state.ray.shutdown()
        DataRoots.use(None)
        # a process that exits while the thread is inside PyTorch aborts ("terminate called
        # without an active exception", exit status 134): a service stopped seconds after it
        # started did
        warming.join()

    app = FastAPI(
        title="ratebench",
        version=__version__,
        summary="Which learning-rate scheme should I train this network with, and at which rate?",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = get_engine(url, settings.resolved_pool_size(), settings.db_pool_timeout)
    app.state.scheduler = None  # set by the lifespan when this process runs the scheduler

    def scheduler_leases() -> LeaseCounters | None:
        scheduler: Scheduler | None = app.state.scheduler
        return scheduler.leases if scheduler is not None else None

    app.state.metrics = AppMetrics(app.state.engine, scheduler_leases)
    # Ray is needed to run studies; an API that only serves (the scheduler runs elsewhere)
    # never joins it: a Ray driver needs a raylet on its own machine (service.ray_runtime).
    needs_ray = settings.run_scheduler
    app.state.ray = RayRuntime(
        settings.ray_address, enabled=start_ray and needs_ray, announce_in=settings.data_dir
    )
    for module in (health, studies, export, plots, leaderboard, catalog):  # every router, here
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(metrics.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    app.add_middleware(NoNulInUrl)
    app.add_middleware(JsonDepthLimit)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)  # outermost: counts all
    install_error_handlers(app)
    for error in _MAYBE_UNAVAILABLE:
        app.add_exception_handler(error, _database_unavailable)
    if not settings.anonymous_reads:
        app.openapi = lambda: _openapi_with_keyed_reads(app)  # type: ignore[method-assign]
    return app


def _openapi_with_keyed_reads(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of an app whose reads need a key: every operation that reads
    through `read_db` lists the bearer scheme too (writes list it by their dependency)."""
    schema = app.openapi_schema
    if schema is None:
        schema = FastAPI.openapi(app)  # FastAPI's document, cached on the app
        requirement: dict[str, list[str]] = {BEARER.scheme_name: []}
        for route in iter_route_contexts(app.routes):
            if not isinstance(route.original_route, APIRoute) or not uses_dependency(
                route.original_route.dependant, read_db
            ):
                continue
            for method in route.methods or ():
                operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                if operation is not None and requirement not in operation.get("security", []):
                    operation.setdefault("security", []).append(requirement)
    return schema
