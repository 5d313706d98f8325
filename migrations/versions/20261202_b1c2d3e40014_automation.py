"""Issue 14: feedback pools, retraining policies, schedules, dedupe, webhooks.

Revision ID: b1c2d3e40014
Revises: b1c2d3e40013
Create Date: 2026-12-02 01:15:00

"""
from typing import Sequence, Union

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401


# revision identifiers, used by Alembic.
revision: str = 'b1c2d3e40014'
down_revision: Union[str, Sequence[str], None] = 'b1c2d3e40013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Tables of issue 14: job lineage (dedupe key), feedback pools, retraining, schedules, webhook outbox."""
    op.create_table('retrain_policies',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('adapter_name', sa.String(length=64), nullable=False),
    sa.Column('every', sa.Integer(), nullable=False),
    sa.Column('replay', sa.Double(), nullable=False),
    sa.Column('max_steps', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_retrain_policies')),
    sa.UniqueConstraint('adapter_name', name=op.f('uq_retrain_policies_adapter_name'))
    )
    op.create_table('schedules',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('cron', sa.String(length=128), nullable=True),
    sa.Column('every_seconds', sa.Integer(), nullable=True),
    sa.Column('paused', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedules')),
    sa.UniqueConstraint('name', name=op.f('uq_schedules_name'))
    )
    op.create_table('feedback_rows',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('adapter_name', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('row', sa.JSON(), nullable=False),
    sa.Column('batch_key', sa.String(length=512), nullable=False),
    sa.Column('used_by_job_id', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['used_by_job_id'], ['jobs.id'], name=op.f('fk_feedback_rows_used_by_job_id_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback_rows')),
    sa.UniqueConstraint('adapter_name', 'sha256', name=op.f('uq_feedback_rows_adapter_name_sha256'))
    )
    op.create_index(op.f('ix_feedback_rows_adapter_name'), 'feedback_rows', ['adapter_name'], unique=False)
    op.create_index(op.f('ix_feedback_rows_used_by_job_id'), 'feedback_rows', ['used_by_job_id'], unique=False)
    op.create_table('job_lineage',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('content_key', sa.String(length=64), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('replay_of', sa.String(length=80), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_lineage_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_job_lineage'))
    )
    op.create_index(op.f('ix_job_lineage_content_key'), 'job_lineage', ['content_key'], unique=False)
    op.create_table('retrain_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('adapter_name', sa.String(length=64), nullable=False),
    sa.Column('pool_sha256', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('parent', sa.String(length=80), nullable=False),
    sa.Column('rows', sa.JSON(), nullable=False),
    sa.Column('replay_rows', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_retrain_runs_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_retrain_runs')),
    sa.UniqueConstraint('adapter_name', 'pool_sha256', name=op.f('uq_retrain_runs_adapter_name_pool_sha256'))
    )
    op.create_index(op.f('ix_retrain_runs_job_id'), 'retrain_runs', ['job_id'], unique=False)
    op.create_table('schedule_firings',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('schedule_id', sa.String(length=32), nullable=False),
    sa.Column('slot_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('fired_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['schedule_id'], ['schedules.id'], name=op.f('fk_schedule_firings_schedule_id_schedules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedule_firings')),
    sa.UniqueConstraint('schedule_id', 'slot_at', name=op.f('uq_schedule_firings_schedule_id_slot_at'))
    )
    op.create_index(op.f('ix_schedule_firings_schedule_id'), 'schedule_firings', ['schedule_id'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('event', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_webhook_deliveries_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('job_id', 'url', 'event', name=op.f('uq_webhook_deliveries_job_id_url_event'))
    )
    op.create_index(op.f('ix_webhook_deliveries_job_id'), 'webhook_deliveries', ['job_id'], unique=False)
    op.create_index(op.f('ix_webhook_deliveries_state'), 'webhook_deliveries', ['state'], unique=False)
    op.create_table('webhook_attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.String(length=32), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['delivery_id'], ['webhook_deliveries.id'], name=op.f('fk_webhook_attempts_delivery_id_webhook_deliveries'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_attempts'))
    )
    op.create_index(op.f('ix_webhook_attempts_delivery_id'), 'webhook_attempts', ['delivery_id'], unique=False)


def downgrade() -> None:
    """Drop them."""
    op.drop_index(op.f('ix_webhook_attempts_delivery_id'), table_name='webhook_attempts')
    op.drop_table('webhook_attempts')
    op.drop_index(op.f('ix_webhook_deliveries_state'), table_name='webhook_deliveries')
    op.drop_index(op.f('ix_webhook_deliveries_job_id'), table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index(op.f('ix_schedule_firings_schedule_id'), table_name='schedule_firings')
    op.drop_table('schedule_firings')
    op.drop_index(op.f('ix_retrain_runs_job_id'), table_name='retrain_runs')
    op.drop_table('retrain_runs')
    op.drop_index(op.f('ix_job_lineage_content_key'), table_name='job_lineage')
    op.drop_table('job_lineage')
    op.drop_index(op.f('ix_feedback_rows_used_by_job_id'), table_name='feedback_rows')
    op.drop_index(op.f('ix_feedback_rows_adapter_name'), table_name='feedback_rows')
    op.drop_table('feedback_rows')
    op.drop_table('schedules')
    op.drop_table('retrain_policies')
