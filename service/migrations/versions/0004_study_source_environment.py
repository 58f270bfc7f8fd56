"""studies: source (api or cli), environment, longer ids

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

`ratebench run` records its studies beside the API's: `source` tells them apart ("api" for every
existing row), and such a study's id is the run's study key (the spec's name plus a hash, or
`--study-key`), which can be longer than the 32 hex digits of an API study's id.
`environment` is what ran the study (`worker.environment`), null for studies run before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id_width(table: str, column: str, old: int, new: int) -> None:
    with op.batch_alter_table(table) as batch:
        batch.alter_column(
            column, existing_type=sa.String(length=old), type_=sa.String(length=new),
            existing_nullable=False,
        )  # fmt: skip


def upgrade() -> None:
    with op.batch_alter_table("ratebench_studies") as batch:
        batch.add_column(
            sa.Column("source", sa.String(length=16), server_default="api", nullable=False)
        )
        batch.add_column(sa.Column("environment", sa.JSON(), nullable=True))
    _id_width("ratebench_studies", "id", 32, 100)
    _id_width("ratebench_arm_results", "study_id", 32, 100)


def downgrade() -> None:
    op.execute("DELETE FROM ratebench_studies WHERE source = 'cli'")  # their ids may not fit
    _id_width("ratebench_arm_results", "study_id", 100, 32)
    _id_width("ratebench_studies", "id", 100, 32)
    with op.batch_alter_table("ratebench_studies") as batch:
        batch.drop_column("environment")
        batch.drop_column("source")
