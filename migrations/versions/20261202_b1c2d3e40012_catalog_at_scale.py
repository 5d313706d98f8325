"""Issue 12: indexes for listing jobs at scale (created_at, state+created_at).

Revision ID: b1c2d3e40012
Revises: 37ad681e8932
Create Date: 2026-12-02 01:15:00

"""
from typing import Sequence, Union

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


# revision identifiers, used by Alembic.
revision: str = 'b1c2d3e40012'
down_revision: Union[str, Sequence[str], None] = '37ad681e8932'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Indexes in the listing's order: all jobs newest first, and one state's jobs newest first."""
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"])
    op.create_index("ix_jobs_state_created_at_id", "jobs", ["state", "created_at", "id"])


def downgrade() -> None:
    """Drop them."""
    op.drop_index("ix_jobs_state_created_at_id", table_name="jobs")
    op.drop_index("ix_jobs_created_at_id", table_name="jobs")
