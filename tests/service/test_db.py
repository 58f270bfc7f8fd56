"""Migrations and engine settings, on a real SQLite file and the real PostgreSQL server."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from service.db import (
    SQLITE_BUSY_TIMEOUT_MS,
    VERSION_TABLE,
    _alembic_config,
    get_engine,
    is_unavailable,
    migrate,
)

OUR_TABLES = {"ratebench_studies", "ratebench_arm_results", "ratebench_api_keys"}


def test_migrations_create_our_tables_and_are_idempotent(database_url: str) -> None:
    migrate(database_url)
    migrate(database_url)  # a second start must find nothing to do
    engine = get_engine(database_url)
    tables = set(sa.inspect(engine).get_table_names())
    assert tables >= OUR_TABLES
    with engine.connect() as conn:
        versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    head = ScriptDirectory.from_config(_alembic_config(database_url)).get_current_head()
    assert [v[0] for v in versions] == [head]


def test_our_migrations_and_optunas_share_one_database(database_url: str) -> None:
    """Optuna's own Alembic history lives in `alembic_version`; ours must not collide."""
    optuna.storages.RDBStorage(database_url)  # creates Optuna's schema first
    migrate(database_url)
    storage = optuna.storages.RDBStorage(database_url)  # and Optuna still accepts it
    study = optuna.create_study(storage=storage, study_name="coexist")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    tables = set(sa.inspect(get_engine(database_url)).get_table_names())
    assert {"studies", "trials", "alembic_version", VERSION_TABLE} <= tables
    assert len(study.trials) == 2


def test_sqlite_connections_use_wal_and_a_busy_timeout(sqlite_url: str) -> None:
    engine = get_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() == SQLITE_BUSY_TIMEOUT_MS
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1


def test_postgres_engine_has_a_bounded_pool(postgres_url: str) -> None:
    engine = get_engine(postgres_url, pool_size=3)
    assert engine.pool.size() == 3  # type: ignore[attr-defined]


def test_a_session_whose_connection_died_mid_transaction_is_unavailable(postgres_url: str) -> None:
    """The server ends the session's connection mid-transaction (as a crash does): the next
    statement fails with the lost connection, and the one after with SQLAlchemy's
    PendingRollbackError, which Optuna's storage meets when it retries a failed read on the
    same session (a chaos soak's study failed so). Both are an outage, to wait out, not a
    failure of the study."""
    engine = sa.create_engine(postgres_url)
    admin = sa.create_engine(postgres_url)
    try:
        with Session(engine) as session:
            backend = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with admin.begin() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            with pytest.raises(sa.exc.OperationalError) as lost:
                session.execute(sa.text("SELECT 1"))
            assert is_unavailable(lost.value)
            with pytest.raises(sa.exc.PendingRollbackError) as pending:
                session.execute(sa.text("SELECT 1"))
            assert is_unavailable(pending.value)
            wrapped = optuna.exceptions.StorageInternalError("An exception is raised ...")
            wrapped.__cause__ = pending.value  # as Optuna raises it
            assert is_unavailable(wrapped)
    finally:
        engine.dispose()
        admin.dispose()


def test_a_session_rolled_back_after_a_failed_flush_is_not_unavailable() -> None:
    """The other PendingRollbackError (a flush failed, on bad data say) is the caller's error."""
    flush = sa.exc.PendingRollbackError(
        "This Session's transaction has been rolled back due to a previous exception during "
        "flush. To begin a new transaction with this Session, first issue Session.rollback()."
    )
    assert not is_unavailable(flush)
