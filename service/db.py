"""The database: one SQLAlchemy engine per URL, sessions, and migrations run at start-up.

ratebench's own tables live beside Optuna's in the same database (SQLite file or PostgreSQL),
so they carry a `ratebench_` prefix and Alembic records their version in
`ratebench_alembic_version` (Optuna's migrations own `alembic_version`).

SQLite: WAL journal (readers never block the writer), a busy timeout (a writer waits for the
lock instead of failing with "database is locked") and foreign keys on, set on every connection.
Transactions begin `IMMEDIATE`: a writer takes the write lock when it begins, while the busy
timeout still applies. A `DEFERRED` transaction that read first and writes later must upgrade
its lock, and SQLite refuses that upgrade at once ("database is locked", no waiting) when
another writer committed in between. Read-only work (`session_scope(..., read_only=True)`)
begins `DEFERRED`, so readers never queue behind writers.
PostgreSQL: a bounded pool, `pool_pre_ping` so a restarted server costs one retry, not an error.

Every pool is bounded (`pool_size`, no overflow) and waits `pool_timeout` seconds for a free
connection; the API sizes it from its settings so that each thread that may hold a connection
finds one (`service.config.Settings.resolved_pool_size`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.storage import make_sqlite_folder

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "UtcDateTime",
    "database_reachable",
    "get_engine",
    "is_postgres",
    "is_sqlite",
    "is_unavailable",
    "migrate",
    "retry_while_unavailable",
    "session_scope",
]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "ratebench_alembic_version"
_SQLITE_BEGIN = "ratebench_sqlite_begin"  # execution option: how a SQLite transaction begins
# sqlite3 reports these as OperationalError like any other failure; only these are transient.
# A session whose connection was lost mid-transaction says so on its next use; Optuna's storage
# catches the first error of a read and retries it on the same session, and meets this one.
_RECONNECT = "Can't reconnect until invalid transaction is rolled back"
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "unable to open", "disk i/o error")

T = TypeVar("T")


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (UTC).

    PostgreSQL's `timestamptz` returns aware values, but SQLite has no timezone type: SQLAlchemy
    stores the wall-clock digits and returns naive datetimes, which the API would then serialise
    without an offset. Binding converts to UTC (a naive value is taken as UTC) and drops the
    offset for SQLite; reading attaches UTC, so both databases give the same answers."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.replace(tzinfo=None) if dialect.name == "sqlite" else aware

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN; `_on_sqlite_begin` does
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _on_sqlite_begin(conn: sa.Connection) -> None:
    mode = conn.get_execution_options().get(_SQLITE_BEGIN, "IMMEDIATE")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _create_engine(url: str, pool_size: int, pool_timeout: float) -> sa.Engine:
    parsed = make_url(url)
    pool: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": pool_timeout}
    if parsed.get_backend_name() == "sqlite":
        make_sqlite_folder(url)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            poolclass=sa.pool.QueuePool,
            **pool,
        )
        sa.event.listen(engine, "connect", _on_sqlite_connect)
        sa.event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, **pool)


@lru_cache(maxsize=8)
def get_engine(url: str, pool_size: int = 5, pool_timeout: float = 30.0) -> sa.Engine:
    """The process's engine for `url` (engines own connection pools: one per URL)."""
    return _create_engine(url, pool_size, pool_timeout)


@lru_cache(maxsize=16)
def _session_factory(engine: sa.Engine, read_only: bool) -> sessionmaker[Session]:
    bind = engine.execution_options(**{_SQLITE_BEGIN: "DEFERRED"}) if read_only else engine
    return sessionmaker(bind, expire_on_commit=False)


@contextmanager
def session_scope(engine: sa.Engine, *, read_only: bool = False) -> Iterator[Session]:
    """A session committed on success and rolled back on error. `read_only` work begins its
    SQLite transactions DEFERRED (a shared read, never queued behind a writer); it must not
    write, or it risks the lock upgrade that SQLite refuses without waiting."""
    session = _session_factory(engine, read_only)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring ratebench's tables to the newest schema (idempotent; safe to run at every start)."""
    log.info("migrating %s", make_url(url).render_as_string(hide_password=True))
    command.upgrade(_alembic_config(url), "head")


def database_reachable(engine: sa.Engine) -> tuple[bool, str]:
    """Whether a trivial query succeeds, and the error message when it does not."""
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_SQLITE_BEGIN: "DEFERRED"})
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        return False, str(exc.__cause__ or exc).splitlines()[0]
    return True, ""


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, says the database cannot serve now
    (server down or restarting, connection lost, pool exhausted, SQLite lock not granted in
    time): a condition to answer 503 to and to retry, unlike a wrong query or bad data."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa.exc.TimeoutError | sa.exc.InterfaceError):
            return True
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sa.exc.PendingRollbackError) and _RECONNECT in str(current):
            return True  # the connection was lost mid-transaction (the error itself was caught)
        if isinstance(current, sa.exc.OperationalError):
            if type(current.orig).__module__.startswith("sqlite3"):
                return str(current.orig).lower().startswith(_SQLITE_TRANSIENT)
            return True
        current = current.__cause__
    return False


def retry_while_unavailable(
    action: Callable[[], T],
    what: str,
    stopping: threading.Event | None = None,
    *,
    first_delay: float = 0.5,
    max_delay: float = 10.0,
) -> T:
    """`action()`, retried with exponential backoff while the database is unavailable (see
    `is_unavailable`); any other error is raised at once. `stopping` ends the wait early: the
    last error is then raised, so a shutting-down process does not wait for the database."""
    delay = first_delay
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what,
                        str(exc).splitlines()[0], delay)  # fmt: skip
            if stopping is not None:
                if stopping.wait(delay):
                    raise
            else:
                time.sleep(delay)
            delay = min(2 * delay, max_delay)
