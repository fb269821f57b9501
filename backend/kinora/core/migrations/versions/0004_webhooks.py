"""webhooks: a user's signing secret, a video's webhook URL and events, and every
delivery attempt

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 16:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook_secret', sa.String(length=64), nullable=True))
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook_url', sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column('webhook_events', sa.JSON(), nullable=True))
    op.create_table(
        'webhook_attempts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('video_id', sa.Integer(), nullable=False),
        sa.Column('event', sa.String(length=16), nullable=False),
        sa.Column('webhook_id', sa.String(length=64), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('url', sa.String(length=2048), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('duration_ms', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['video_id'], ['videos.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_webhook_attempts_video', 'webhook_attempts', ['video_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_webhook_attempts_video', table_name='webhook_attempts')
    op.drop_table('webhook_attempts')
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.drop_column('webhook_events')
        batch_op.drop_column('webhook_url')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('webhook_secret')
