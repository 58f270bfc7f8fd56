"""study status: room for completed_with_errors

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

A study some of whose arms failed while others produced results ends `completed_with_errors`
(21 characters); 0001 made `status` 16 characters wide.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ratebench_studies") as batch:
        batch.alter_column(
            "status", existing_type=sa.String(length=16), type_=sa.String(length=32),
            existing_nullable=False,
        )  # fmt: skip


def downgrade() -> None:
    op.execute(
        "UPDATE ratebench_studies SET status = 'failed' WHERE status = 'completed_with_errors'"
    )
    with op.batch_alter_table("ratebench_studies") as batch:
        batch.alter_column(
            "status", existing_type=sa.String(length=32), type_=sa.String(length=16),
            existing_nullable=False,
        )  # fmt: skip
