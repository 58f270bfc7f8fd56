"""Authentication dependencies: a key for every write, and for reads unless they are open.

A missing, unknown or revoked key gets the same 401 before anything is looked up, so the
answer never tells whether a study exists.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.api.deps import SessionDep, SettingsDep
from service.auth import verify_key
from service.models import ApiKey

_UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    detail="a valid API key is required: send 'Authorization: Bearer <key>' "
    "(create one with `ratebench keys create --name NAME`)",
    headers={"WWW-Authenticate": "Bearer"},
)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_key(request: Request, session: SessionDep) -> ApiKey:
    token = _bearer(request)
    key = verify_key(session, token) if token else None
    if key is None:
        raise _UNAUTHORIZED
    return key


def read_access(request: Request, session: SessionDep, settings: SettingsDep) -> ApiKey | None:
    if settings.anonymous_reads:
        return None
    return require_key(request, session)


WriteKey = Annotated[ApiKey, Depends(require_key)]
ReadAccess = Annotated[ApiKey | None, Depends(read_access)]
