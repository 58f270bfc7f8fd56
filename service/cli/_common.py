"""Pieces every CLI sub-command uses."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session


class CliError(Exception):
    """A mistake of the user's, reported as one line without a traceback."""


SubParsers = Any  # argparse's _SubParsersAction is private; this alias keeps signatures readable.


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the database (default: RATEBENCH_DATABASE_URL or a SQLite file)",
    )


def database_url(args: argparse.Namespace) -> str:
    from service.config import get_settings

    url: str = args.database_url or get_settings().resolved_database_url()
    return url


@contextmanager
def open_database(args: argparse.Namespace) -> Iterator[Session]:
    """A session on the (migrated) database named by --database-url or the settings."""
    import sqlalchemy as sa

    from service.db import get_engine, migrate, session_scope

    url = database_url(args)
    try:
        migrate(url)
    except sa.exc.OperationalError as exc:
        raise CliError(f"cannot open the database: {str(exc.orig).strip()}") from None
    with session_scope(get_engine(url)) as session:
        yield session
