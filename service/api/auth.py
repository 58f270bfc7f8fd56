"""Authentication: a key for every write, and for reads unless they are open.

Reading the bearer token touches no database, so it is a plain async dependency. Looking the
key up is database work, done by `authenticate` inside the request's one unit of database work
(`service.api.deps.Db.run`), in the same thread and session as the rest of the request: a
request never holds a connection while it waits for a thread.

A missing, unknown or revoked key gets the same 401 before anything else is looked up, so the
answer never tells whether a study exists.
"""

from __future__ import annotations

from fastapi import HTTPException, Request, status
from sqlalchemy.orm import Session

from service.auth import verify_key
from service.models import ApiKey

__all__ = ["UNAUTHORIZED", "authenticate", "bearer_token"]

UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    detail="a valid API key is required: send 'Authorization: Bearer <key>' "
    "(create one with `ratebench keys create --name NAME`)",
    headers={"WWW-Authenticate": "Bearer"},
)


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(session: Session, token: str | None, *, required: bool) -> ApiKey | None:
    """The caller's active key; 401 when one is `required` and `token` names none. An optional
    key (an open read) is not looked up at all: reads stay one query cheaper."""
    if not required:
        return None
    key = verify_key(session, token) if token else None
    if key is None:
        raise UNAUTHORIZED
    return key
