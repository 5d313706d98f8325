"""Initial catalog: jobs and their events and checkpoints, adapter versions and their files.

Revision ID: 37ad681e8932
Revises:
Create Date: 2026-11-23 15:16:07.244064

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '37ad681e8932'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Create every table of the catalog."""
    # The truth about every job; `attempt` is the fencing token of the worker that holds the lease.
    op.create_table('jobs',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('queue', sa.String(length=64), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('spec_hash', sa.String(length=64), nullable=False),
        sa.Column('submitted_by', sa.String(length=128), nullable=True),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('max_attempts', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=255), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('progress', sa.JSON(), nullable=True),
        sa.Column('error_code', sa.String(length=64), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_name'), 'jobs', ['name'], unique=False)
    op.create_index(op.f('ix_jobs_state'), 'jobs', ['state'], unique=False)
    # One row per adapter version; `publishing` rows are reserved versions not yet visible to readers.
    op.create_table('adapters',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('prefix', sa.String(length=512), nullable=False),
        sa.Column('base_model', sa.String(length=1024), nullable=True),
        sa.Column('base_model_sha256', sa.String(length=64), nullable=True),
        sa.Column('dataset_uri', sa.String(length=1024), nullable=True),
        sa.Column('dataset_sha256', sa.String(length=64), nullable=True),
        sa.Column('source_model', sa.String(length=1024), nullable=True),
        sa.Column('source_model_sha256', sa.String(length=64), nullable=True),
        sa.Column('parent_adapter_id', sa.Integer(), nullable=True),
        sa.Column('spec_hash', sa.String(length=64), nullable=False),
        sa.Column('provenance', sa.JSON(), nullable=True),
        sa.Column('metrics', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_adapters_job_id_jobs')),
        sa.ForeignKeyConstraint(['parent_adapter_id'], ['adapters.id'], name=op.f('fk_adapters_parent_adapter_id_adapters')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters')),
        sa.UniqueConstraint('job_id', name=op.f('uq_adapters_job_id')),
        sa.UniqueConstraint('name', 'version', name=op.f('uq_adapters_name_version'))
    )
    op.create_index(op.f('ix_adapters_name'), 'adapters', ['name'], unique=False)
    op.create_table('checkpoints',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('prefix', sa.String(length=512), nullable=False),
        sa.Column('files', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_checkpoints_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_checkpoints')),
        sa.UniqueConstraint('job_id', 'step', name=op.f('uq_checkpoints_job_id_step'))
    )
    op.create_index(op.f('ix_checkpoints_job_id'), 'checkpoints', ['job_id'], unique=False)
    # BIGINT on PostgreSQL; SQLite needs INTEGER for an autoincrementing rowid key.
    op.create_table('job_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=True),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_events_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_events'))
    )
    op.create_index(op.f('ix_job_events_job_id'), 'job_events', ['job_id'], unique=False)
    op.create_table('adapter_files',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('adapter_id', sa.Integer(), nullable=False),
        sa.Column('path', sa.String(length=512), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('etag', sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_adapter_files_adapter_id_adapters'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_files')),
        sa.UniqueConstraint('adapter_id', 'path', name=op.f('uq_adapter_files_adapter_id_path'))
    )
    op.create_index(op.f('ix_adapter_files_adapter_id'), 'adapter_files', ['adapter_id'], unique=False)


def downgrade() -> None:
    """Drop every table of the catalog (its data with them)."""
    op.drop_index(op.f('ix_adapter_files_adapter_id'), table_name='adapter_files')
    op.drop_table('adapter_files')
    op.drop_index(op.f('ix_job_events_job_id'), table_name='job_events')
    op.drop_table('job_events')
    op.drop_index(op.f('ix_checkpoints_job_id'), table_name='checkpoints')
    op.drop_table('checkpoints')
    op.drop_index(op.f('ix_adapters_name'), table_name='adapters')
    op.drop_table('adapters')
    op.drop_index(op.f('ix_jobs_state'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_name'), table_name='jobs')
    op.drop_table('jobs')
