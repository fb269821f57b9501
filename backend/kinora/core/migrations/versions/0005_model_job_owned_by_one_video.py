"""a model job belongs to exactly one video: a unique index on videos.model_job_id

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULLs (no model job yet) are distinct in SQLite and PostgreSQL alike.
    op.create_index('uq_videos_model_job_id', 'videos', ['model_job_id'], unique=True)


def downgrade() -> None:
    op.drop_index('uq_videos_model_job_id', table_name='videos')
