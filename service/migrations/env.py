"""Alembic environment for ratebench's own tables (run by `service.db.migrate`)."""

from __future__ import annotations

from alembic import context

from service.db import VERSION_TABLE, get_engine
from service.models import Base

_url = context.config.get_main_option("sqlalchemy.url")
assert _url, "service.db.migrate sets sqlalchemy.url"

with get_engine(_url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        include_name=lambda name, type_, _parent: (
            type_ != "table" or (name or "").startswith("ratebench_")
        ),
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
