"""Issue 10: co-training groups.

No schema change: a group is a set of ordinary claims (each job keeps its own attempt and lease, taken in one
transaction by repository.claim_cotrain_group), and who trained with whom is recorded in each adapter's provenance
(`cotraining`). This revision keeps the chain in order.

Revision ID: b1c2d3e40010
Revises: b1c2d3e40015
Create Date: 2026-12-02 01:15:00

"""
from typing import Sequence, Union

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


# revision identifiers, used by Alembic.
revision: str = 'b1c2d3e40010'
down_revision: Union[str, Sequence[str], None] = 'b1c2d3e40015'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    pass


def downgrade() -> None:
    """Downgrade schema."""
    pass
