"""The database: one SQLAlchemy engine per URL, sessions, and migrations run at start-up.

ratebench's own tables live beside Optuna's in the same database (SQLite file or PostgreSQL),
so they carry a `ratebench_` prefix and Alembic records their version in
`ratebench_alembic_version` (Optuna's migrations own `alembic_version`).

SQLite: WAL journal (readers never block the writer), a busy timeout (a writer waits for the
lock instead of failing with "database is locked") and foreign keys on, set on every connection.
PostgreSQL: a bounded pool, `pool_pre_ping` so a restarted server costs one retry, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.storage import make_sqlite_folder

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "database_reachable",
    "get_engine",
    "is_postgres",
    "migrate",
    "session_scope",
]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "ratebench_alembic_version"


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _create_engine(url: str, pool_size: int) -> sa.Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        make_sqlite_folder(url)
        engine = sa.create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        )
        sa.event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


@lru_cache(maxsize=8)
def get_engine(url: str, pool_size: int = 5) -> sa.Engine:
    """The process's engine for `url` (engines own connection pools: one per URL)."""
    return _create_engine(url, pool_size)


@lru_cache(maxsize=8)
def _session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    session = _session_factory(engine)()
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
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        return False, str(exc.__cause__ or exc).splitlines()[0]
    return True, ""
