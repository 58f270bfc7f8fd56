"""FastAPI dependencies: the settings, the Ray runtime, and the request's database work.

The request path never holds a database connection while it waits for a thread. Endpoints are
`async def` and their dependencies touch no database; all of a request's database work, the
API-key lookup included, is one function run by `Db.run` in a worker thread with its own
session, committed in that thread before the endpoint answers. The thread comes from the app's
database limiter (`Settings.api_threads` threads), and the engine's pool holds at least that
many connections, so a thread that starts database work always finds a connection; requests
beyond the limiter wait for a thread holding nothing.

Every request's database work begins with the caller: its key is looked up (a read with no
token when anonymous reads are on is anonymous), and the key (or the client's address) takes
a token of its request rate (`service.rate_limit`) before anything else is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Concatenate, ParamSpec, TypeVar

import anyio
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from service.api.auth import BearerCredentials, authenticate, bearer_token, credentials_token
from service.comparability import FilterError, parse_filters
from service.config import Settings
from service.db import is_sqlite, session_scope
from service.models import ApiKey
from service.rate_limit import RateLimiter
from service.ray_runtime import RayRuntime

__all__ = [
    "HEALTH_THREADS",
    "HEAVY_THREADS",
    "Db",
    "EngineDep",
    "RayDep",
    "ReadDb",
    "SettingsDep",
    "Tx",
    "WriteDb",
    "in_thread",
    "read_db",
    "set_up_limiters",
    "uses_dependency",
]

HEAVY_THREADS = 4
HEALTH_THREADS = 2
VALIDATE_THREADS = 2
P = ParamSpec("P")
T = TypeVar("T")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> sa.Engine:
    engine: sa.Engine = request.app.state.engine
    return engine


async def get_ray(request: Request) -> RayRuntime:
    runtime: RayRuntime = request.app.state.ray
    return runtime


def set_up_limiters(app: FastAPI, settings: Settings) -> None:
    """Create the app's thread limiters (in the lifespan: they belong to the event loop).

    `db_limiter`: threads doing a request's database work, at most one connection each.
    `write_limiter`: on SQLite, one writing thread at a time. SQLite has one writer anyway;
    writers queued here wait in the event loop, holding no thread, while writers queued on
    SQLite's lock would each hold a thread (and sleep in its busy handler) and starve the
    readers of threads. On PostgreSQL writes share `db_limiter`.
    `heavy_limiter`: work that opens Optuna's storage or renders plots (its own connections and
    CPU), kept few so that it neither exhausts the database's connections nor the CPUs.
    `health_limiter`: /health answers even while every database thread is busy.
    `validate_limiter`: threads validating submitted specs (model builds on the meta device),
    few, so that a burst of submits neither starves reads of threads nor the CPUs.
    `rate_limiter`: the per-key request rates (`service.rate_limit`)."""
    app.state.db_limiter = anyio.CapacityLimiter(settings.api_threads)
    app.state.write_limiter = anyio.CapacityLimiter(
        1 if is_sqlite(settings.resolved_database_url()) else settings.api_threads
    )
    app.state.heavy_limiter = anyio.CapacityLimiter(HEAVY_THREADS)
    app.state.health_limiter = anyio.CapacityLimiter(HEALTH_THREADS)
    app.state.validate_limiter = anyio.CapacityLimiter(VALIDATE_THREADS)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)


async def in_thread(
    request: Request, kind: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`fn(*args, **kwargs)` in a thread of the app's `kind` limiter ("heavy", "health" or
    "validate")."""
    limiter: anyio.CapacityLimiter = getattr(request.app.state, f"{kind}_limiter")
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=limiter)


@dataclass(frozen=True)
class Tx:
    """One request's database work: its session, the caller's key (None for an open read) and
    the settings."""

    session: Session
    key: ApiKey | None
    settings: Settings

    @property
    def caller(self) -> ApiKey:
        """The authenticated key of a write (writes always have one)."""
        if self.key is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="an API key is required")
        return self.key


@dataclass(frozen=True)
class Db:
    """Runs a request's database work: `await db.run(fn, *args)` calls `fn(tx, *args)` in a
    database thread, authenticating first, and returns its result once committed."""

    engine: sa.Engine
    settings: Settings
    limiter: anyio.CapacityLimiter
    token: str | None
    key_required: bool
    read_only: bool
    rate_limiter: RateLimiter
    client: str  # the client's address: an anonymous request's rate identity

    async def run(
        self, fn: Callable[Concatenate[Tx, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await anyio.to_thread.run_sync(
            partial(self._run, True, fn, *args, **kwargs), limiter=self.limiter
        )

    async def run_again(
        self, fn: Callable[Concatenate[Tx, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run` for a request's second unit of database work: the first took its rate."""
        return await anyio.to_thread.run_sync(
            partial(self._run, False, fn, *args, **kwargs), limiter=self.limiter
        )

    async def authorize(self) -> None:
        """Check the key (and take its rate) of a request that needs no other database work
        (the catalog), or before costly work of its own (a submit's validation)."""
        if self.key_required:
            await self.run(_nothing)

    def _run(
        self, rated: bool, fn: Callable[Concatenate[Tx, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        with session_scope(self.engine, read_only=self.read_only) as session:
            key = authenticate(session, self.token, required=self.key_required)
            if rated:
                who = f"key:{key.id}" if key is not None else f"address:{self.client}"
                self.rate_limiter.check(who)
            return fn(Tx(session, key, self.settings), *args, **kwargs)


def _nothing(_tx: Tx) -> None:
    return None


def _db(request: Request, token: str | None, *, write: bool) -> Db:
    settings: Settings = request.app.state.settings
    return Db(
        engine=request.app.state.engine,
        settings=settings,
        limiter=request.app.state.write_limiter if write else request.app.state.db_limiter,
        token=token,
        key_required=write or not settings.anonymous_reads,
        read_only=not write,
        rate_limiter=request.app.state.rate_limiter,
        client=request.client.host if request.client is not None else "unknown",
    )


async def read_db(request: Request) -> Db:
    """Database work of a read: a key only when anonymous reads are off; a shared read."""
    return _db(request, await bearer_token(request), write=False)


async def write_db(request: Request, credentials: BearerCredentials) -> Db:
    """Database work of a write: always a key (declared in the OpenAPI document); on SQLite
    the write lock from the start."""
    return _db(request, credentials_token(credentials), write=True)


def uses_dependency(dependant: Dependant, call: Callable[..., object]) -> bool:
    """Whether `call` is among a route's dependencies, at any depth."""
    return any(sub.call is call or uses_dependency(sub, call) for sub in dependant.dependencies)


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[sa.Engine, Depends(get_engine)]
RayDep = Annotated[RayRuntime, Depends(get_ray)]
ReadDb = Annotated[Db, Depends(read_db)]
WriteDb = Annotated[Db, Depends(write_db)]


_RESERVED = ("task", "metric")  # a task board's own parameters, not setting filters


def read_filters(request: Request, skip_blank: bool = False) -> dict[str, Any]:
    """A task board's setting filters (every query parameter but `task` and `metric`), for the
    API's board and its web page alike; an unknown or repeated name is a 422 that names the
    parameter, as FastAPI's own are."""
    try:
        return parse_filters(request.query_params.multi_items(), _RESERVED, skip_blank)
    except FilterError as exc:
        error = {"type": "value_error", "loc": ("query", exc.name), "msg": str(exc), "input": None}
        raise RequestValidationError([error]) from None


def visible(tx: Tx) -> sa.ColumnElement[bool]:
    """The studies this request's reader may read (`service.privacy.readable`): what a board,
    a profile or a page pools."""
    from service.privacy import readable

    return readable(tx.key, tx.settings.private_studies)
