"""Alembic environment for ratebench's own tables (run by `service.db.migrate`).

On SQLite, batch migrations rebuild a table (create a copy, drop the original, rename). With
foreign keys on, dropping `ratebench_studies` would first delete its rows and cascade to
`ratebench_arm_results`, so foreign keys are switched off on the migrating connection (outside
any transaction, where SQLite honours the pragma), checked after the migration, and switched
back on before the connection returns to the pool.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service.db import VERSION_TABLE, get_engine
from service.models import Base

_url = context.config.get_main_option("sqlalchemy.url")
assert _url, "service.db.migrate sets sqlalchemy.url"


def _sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    if connection.dialect.name == "sqlite":
        raw = connection.connection.driver_connection
        assert raw is not None
        raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


with get_engine(_url).connect() as connection:
    _sqlite_foreign_keys(connection, on=False)
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        include_name=lambda name, type_, _parent: (
            type_ != "table" or (name or "").startswith("ratebench_")
        ),
    )
    try:
        with context.begin_transaction():
            context.run_migrations()
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                assert not broken, f"migration left rows without their parents: {broken}"
        connection.commit()
    finally:
        _sqlite_foreign_keys(connection, on=True)
