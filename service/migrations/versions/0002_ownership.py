"""ownership: admin keys, idempotency keys scoped per API key, a hash of each submitted body

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

0001 made `idempotency_key` unique across all keys, so one key's retry could return another
key's study. The constraint becomes (api_key_id, idempotency_key); `spec_hash` lets a retry
with a different body be told apart (409) from a true retry (200).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STUDIES = "ratebench_studies"
_OLD_UNIQUE = "uq_ratebench_studies_idempotency_key"
_NEW_UNIQUE = "uq_ratebench_studies_key_idempotency"
# SQLite reflects 0001's unnamed unique constraint without a name; this convention names it
# so that batch mode can drop it (PostgreSQL reports the server-generated name instead).
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _unique_name(columns: list[str]) -> str | None:
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints(_STUDIES):
        if constraint["column_names"] == columns:
            return constraint["name"] or _OLD_UNIQUE
    return None


def upgrade() -> None:
    with op.batch_alter_table("ratebench_api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    old = _unique_name(["idempotency_key"])
    with op.batch_alter_table(_STUDIES, schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.add_column(sa.Column("spec_hash", sa.String(length=64), nullable=True))
        if old is not None:
            batch_op.drop_constraint(old, type_="unique")
        batch_op.create_unique_constraint(_NEW_UNIQUE, ["api_key_id", "idempotency_key"])
        batch_op.create_index(
            "ix_ratebench_studies_key_status", ["api_key_id", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table(_STUDIES, schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.drop_index("ix_ratebench_studies_key_status")
        batch_op.drop_constraint(_NEW_UNIQUE, type_="unique")
        batch_op.create_unique_constraint(_OLD_UNIQUE, ["idempotency_key"])
        batch_op.drop_column("spec_hash")
    with op.batch_alter_table("ratebench_api_keys", schema=None) as batch_op:
        batch_op.drop_column("is_admin")
