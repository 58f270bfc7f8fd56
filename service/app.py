"""The FastAPI application factory and its lifespan.

At start-up: migrate the database, connect to Ray in the background, and (unless disabled)
start the study scheduler. Routes live in `service/api/`, one router per resource.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.api import catalog, health, leaderboard, plots, studies
from service.config import Settings, get_settings
from service.db import get_engine, migrate
from service.limits import BodySizeLimit
from service.ray_runtime import RayRuntime
from service.scheduler import Scheduler, SchedulerConfig
from service.web import pages

__all__ = ["create_app"]

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None, *, start_ray: bool = True) -> FastAPI:
    """Build the app; `start_ray=False` serves the API without Ray and without the scheduler
    (tests of the HTTP surface)."""
    settings = settings or get_settings()
    url = settings.resolved_database_url()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(url)
        app.state.ray.start()  # on the main thread: Ray must not be initialised elsewhere
        scheduler = None
        if settings.run_scheduler and app.state.ray.connected:
            scheduler = Scheduler(
                app.state.engine,
                SchedulerConfig(
                    storage_url=url,
                    ray_address=settings.ray_address,
                    lease_seconds=settings.lease_seconds,
                ),
            )
            scheduler.start_in_thread()
        yield
        if scheduler is not None:
            scheduler.stop()
        app.state.ray.shutdown()

    app = FastAPI(
        title="ratebench",
        version=__version__,
        summary="Which learning-rate scheme should I train this network with, and at which rate?",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = get_engine(url, settings.db_pool_size)
    # Ray is needed to run studies; an API that only serves (the scheduler runs elsewhere)
    # connects only when given a cluster address, to report its state on /health.
    needs_ray = settings.run_scheduler or settings.ray_address is not None
    app.state.ray = RayRuntime(settings.ray_address, enabled=start_ray and needs_ray)
    for module in (health, studies, plots, leaderboard, catalog):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
