"""Pieces every CLI sub-command uses: the database options, and the API's client over HTTP.

The API is RATEBENCH_URL (default http://127.0.0.1 at RATEBENCH_PORT, else 8000) and the key
RATEBENCH_API_KEY, or `--url` / `--key`. Problems the API reports (401, 404, 422 with field
paths) become a `CliError`, one line each, never a traceback.

Text that came from the database or the API (study names, errors, arm labels, ...) is the
submitter's, so whatever is printed through rich goes through `safe`: its markup is escaped
(`[/]` would end a style that was never opened, and rich raises) and its control characters
are shown as escapes (`\x1b`), so no escape sequence reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.orm import Session


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(value: Any) -> str:
    """`value` as text for rich: control characters escaped, then markup escaped."""
    from rich.markup import escape

    text = _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode(), str(value))
    return escape(text)


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
    parser.add_argument(
        "--url",
        help="API base URL (default RATEBENCH_URL, else 127.0.0.1 at RATEBENCH_PORT or 8000)",
    )
    parser.add_argument("--key", help="API key (default RATEBENCH_API_KEY)")


def api_response(
    args: argparse.Namespace, method: str, path: str, *, wait_s: float = 0.0, **kwargs: Any
) -> httpx.Response:
    """The API's answer to `method path` (under /api/v1); CliError when it cannot be reached
    or answers with an error. `wait_s`: how long to keep trying while nothing listens yet (an
    API still starting); a refused connection never reached the API, so trying again is safe."""
    import httpx

    from service.config import get_settings

    settings = get_settings()
    base = (args.url or settings.client_url()).rstrip("/")
    key = args.key or settings.api_key
    headers = dict(kwargs.pop("headers", {}))
    if key:
        headers["Authorization"] = f"Bearer {key}"
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            response = httpx.request(
                method, f"{base}/api/v1{path}", headers=headers, timeout=30, **kwargs
            )
            break
        except httpx.ConnectError as exc:
            if time.monotonic() >= deadline:
                raise CliError(f"cannot reach the API at {base}: {exc}") from None
            if not said:  # minutes of silence would read as a hang
                print(f"waiting for the API at {base} to listen (up to {wait_s:.0f} s; "
                      "--wait-for-api sets how long)", file=sys.stderr, flush=True)  # fmt: skip
                said = True
            time.sleep(0.5)
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


def console(stderr: bool = False) -> Any:
    """A rich console on stdout (or stderr). A terminal's own width; `COLUMNS` where it is set
    (rich reads it), terminal or not; a pipe or a file without `COLUMNS` is as wide as the
    output needs (`_UNBOUNDED`), so no table, column or caption is cut or wrapped (rich would
    otherwise assume 80 columns and crop what does not fit)."""
    import os

    from rich.console import Console

    out = Console(stderr=stderr)
    if out.is_terminal or os.environ.get("COLUMNS", "").strip().isdigit():
        return out
    return Console(stderr=stderr, width=_UNBOUNDED)


# Wider than any table the CLI prints: a table takes its natural width, a line its own length.
_UNBOUNDED = 100_000
