"""Pieces every CLI sub-command uses: the database options, and the API's client over HTTP.

The API is RATEBENCH_URL (default http://127.0.0.1:8000) and the key RATEBENCH_API_KEY, or
`--url` / `--key`. Problems the API reports (401, 404, 422 with field paths) become a
`CliError`, one line each, never a traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.orm import Session


class CliError(Exception):
    """A mistake of the user's, reported as one line without a traceback."""


SubParsers = Any  # argparse's _SubParsersAction is private; this alias keeps signatures readable.


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        "--database",
        dest="database_url",
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


def add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="API base URL (default RATEBENCH_URL or 127.0.0.1:8000)")
    parser.add_argument("--key", help="API key (default RATEBENCH_API_KEY)")


def api_response(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """The API's answer to `method path` (under /api/v1); CliError when it cannot be reached
    or answers with an error."""
    import httpx

    from service.config import get_settings

    settings = get_settings()
    base = (args.url or settings.url).rstrip("/")
    key = args.key or settings.api_key
    headers = dict(kwargs.pop("headers", {}))
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = httpx.request(
            method, f"{base}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the API at {base}: {exc}") from None
    if response.status_code >= 400:
        raise CliError(describe_error(response.status_code, response.text))
    return response


def api_json(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """The API's JSON answer to `method path` (see `api_response`)."""
    return api_response(args, method, path, **kwargs).json()


def describe_error(code: int, text: str) -> str:
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    if isinstance(detail, list):  # FastAPI validation errors: one line per field
        lines = []
        for item in detail:
            loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
            lines.append(f"{loc or 'body'}: {item.get('msg', item)}")
        detail = "\n  ".join(lines)
    return f"HTTP {code}: {detail}"


def console() -> Any:
    """A rich console on stdout; a pipe or file gets the whole table, not 80 columns."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)
