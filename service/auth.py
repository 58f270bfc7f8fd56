"""API keys: created by `ratebench keys create`, sent as `Authorization: Bearer <key>`.

A key is `rb_` + 43 URL-safe characters (256 random bits). Only its SHA-256 hash is stored: with
that much entropy a slow password hash adds nothing, and lookups stay one indexed equality.
Revoked keys stay in the table so that studies keep their submitter.

Every active key may submit studies and cancel the studies it submitted. An admin key
(`ratebench keys create --admin`) may also cancel anyone's studies; admin keys are made only
from the command line, by whoever can reach the database, never through the API.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import ApiKey, utcnow

__all__ = ["CreatedKey", "create_key", "hash_key", "list_keys", "revoke_key", "verify_key"]

KEY_PREFIX = "rb_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedKey:
    id: int
    name: str
    key: str  # shown once, never stored
    admin: bool = False


def create_key(session: Session, name: str, *, admin: bool = False) -> CreatedKey:
    """A new key; `admin` keys may cancel any study, not only their own."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("name: must be 1 to 100 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(key), prefix=key[:10], is_admin=admin)
    session.add(row)
    session.flush()
    return CreatedKey(row.id, name, key, admin)


def verify_key(session: Session, key: str) -> ApiKey | None:
    """The active key matching `key`, or None (unknown and revoked keys look the same)."""
    if not key.startswith(KEY_PREFIX):
        return None
    row = session.scalars(sa.select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_key(session: Session, key_id: int) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return True


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(sa.select(ApiKey).order_by(ApiKey.id)))
