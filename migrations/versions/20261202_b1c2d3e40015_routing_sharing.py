"""Issue 15: routing profiles, imported adapters, remotes.

Revision ID: b1c2d3e40015
Revises: b1c2d3e40014
Create Date: 2026-12-02 01:15:00

"""
from typing import Sequence, Union

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


# revision identifiers, used by Alembic.
revision: str = 'b1c2d3e40015'
down_revision: Union[str, Sequence[str], None] = 'b1c2d3e40014'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Routing profiles of adapter versions, origins of imported ones, remote farms, this farm's id."""
    op.create_table('adapter_profiles',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('adapter_id', sa.Integer(), nullable=False),
        sa.Column('description', sa.Text(), nullable=True),
        sa.Column('tags', sa.JSON(), nullable=False),
        sa.Column('prompts', sa.JSON(), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('embedding_model', sa.String(length=1024), nullable=True),
        sa.Column('embedding', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_profiles_adapter_id_adapters'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_profiles')),
        sa.UniqueConstraint('adapter_id', name=op.f('uq_adapter_profiles_adapter_id')),
    )
    op.create_table('adapter_origins',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('adapter_id', sa.Integer(), nullable=False),
        sa.Column('farm_id', sa.String(length=64), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=True),
        sa.Column('checksums_sha256', sa.String(length=64), nullable=False),
        sa.Column('source', sa.String(length=1024), nullable=False),
        sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_origins_adapter_id_adapters'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_origins')),
        sa.UniqueConstraint('adapter_id', name=op.f('uq_adapter_origins_adapter_id')),
    )
    op.create_index(op.f('ix_adapter_origins_farm_id'), 'adapter_origins', ['farm_id'], unique=False)
    op.create_table('remotes',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('url', sa.String(length=1024), nullable=False),
        sa.Column('token_env', sa.String(length=128), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_remotes')),
        sa.UniqueConstraint('name', name=op.f('uq_remotes_name')),
    )
    op.create_table('farm_identity',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_farm_identity')),
    )


def downgrade() -> None:
    """Drop the tables of issue 15."""
    op.drop_table('farm_identity')
    op.drop_table('remotes')
    op.drop_index(op.f('ix_adapter_origins_farm_id'), table_name='adapter_origins')
    op.drop_table('adapter_origins')
    op.drop_table('adapter_profiles')
