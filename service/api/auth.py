"""Authentication: a key for every write, and for reads unless they are open.

Reading the bearer token touches no database, so it is a plain async dependency. Looking the
key up is database work, done by `authenticate` inside the request's one unit of database work
(`service.api.deps.Db.run`), in the same thread and session as the rest of the request: a
request never holds a connection while it waits for a thread.

A missing, unknown or revoked key gets the same 401 before anything else is looked up, so the
answer never tells whether a study exists.

The token is read by FastAPI's `HTTPBearer` (without its own 401: ours says how to get a key),
so the OpenAPI document declares the bearer scheme and /docs offers to authorize. Writes declare
it as a dependency (`BearerCredentials`); reads call `bearer_token` directly, declaring nothing,
because most deployments serve them without a key (the app documents reads as needing one when
`anonymous_reads` is off).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.auth import verify_key
from service.models import ApiKey

__all__ = [
    "BEARER",
    "UNAUTHORIZED",
    "BearerCredentials",
    "authenticate",
    "bearer_token",
    "credentials_token",
]

UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    detail="a valid API key is required: send 'Authorization: Bearer <key>' "
    "(create one with `ratebench keys create --name NAME`)",
    headers={"WWW-Authenticate": "Bearer"},
)


BEARER = HTTPBearer(
    scheme_name="BearerAuth",
    description="An API key, sent as `Authorization: Bearer <key>`; create one with "
    "`ratebench keys create --name NAME`.",
    auto_error=False,  # a missing key is refused by `authenticate`, with UNAUTHORIZED
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]


def credentials_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    return credentials.credentials if credentials is not None else None


async def bearer_token(request: Request) -> str | None:
    """The bearer token of a request whose route does not declare the scheme (a read)."""
    return credentials_token(await BEARER(request))


def authenticate(session: Session, token: str | None, *, required: bool) -> ApiKey | None:
    """The caller's active key; 401 when one is `required` and `token` names none, or when a
    token is sent that names no active key. An open read without a token is anonymous (None)
    and looks nothing up; with a token it is that key's read (its own private studies, its
    own rate)."""
    if not required and not token:
        return None
    key = verify_key(session, token) if token else None
    if key is None:
        raise UNAUTHORIZED
    return key
