"""Issue 11: recovery and a hardened API.

Revision ID: b1c2d3e40011
Revises: b1c2d3e40016
Create Date: 2026-12-02 01:15:00

"""
from typing import Sequence, Union

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


# revision identifiers, used by Alembic.
revision: str = 'b1c2d3e40011'
down_revision: Union[str, Sequence[str], None] = 'b1c2d3e40016'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    pass


def downgrade() -> None:
    """Downgrade schema."""
    pass
