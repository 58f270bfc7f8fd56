"""studies: public, readable by every key when studies are private

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

With `RATEBENCH_PRIVATE_STUDIES=true` a key reads only its own studies; a study whose owner
marked it `public` (at submit, or later) is readable by every key, and by anonymous readers
where anonymous reads are on. Existing studies stay private (false).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "ratebench_studies",
        sa.Column("public", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("ratebench_studies") as batch:
        batch.drop_column("public")
