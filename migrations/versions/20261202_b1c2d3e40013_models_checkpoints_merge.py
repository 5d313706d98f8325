"""Issue 13: Hub/S3 base models, checkpoints, merged models.

Checkpoints record the train and eval loss at their step (`farm checkpoints`). Merged models are catalog entries
of kind `merge` in the adapters table: no other schema change.

Revision ID: b1c2d3e40013
Revises: b1c2d3e40012
Create Date: 2026-12-02 01:15:00

"""
from typing import Sequence, Union

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


# revision identifiers, used by Alembic.
revision: str = 'b1c2d3e40013'
down_revision: Union[str, Sequence[str], None] = 'b1c2d3e40012'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("metrics")
