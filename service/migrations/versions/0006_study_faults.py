"""studies: faults, what ended each attempt that did not finish

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

A study is resumed after a transient fault (its scheduler died, its Ray runtime or mailbox actor
was lost, the cluster had not yet reported its nodes); `faults` lists each such end, so the
study shows what it survived and the error of a study that ran out of attempts names them all.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ratebench_studies", sa.Column("faults", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ratebench_studies") as batch:
        batch.drop_column("faults")
