"""studies: an index on created_at, for the newest-first list without filters

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

`GET /studies` lists studies newest first. With a `status` filter it walks
`ix_ratebench_studies_status_created`; without one (the default) it had no index to walk and
sorted every study to return a page. This index lets it read the page's rows only.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_ratebench_studies_created"


def upgrade() -> None:
    op.create_index(_INDEX, "ratebench_studies", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="ratebench_studies")
