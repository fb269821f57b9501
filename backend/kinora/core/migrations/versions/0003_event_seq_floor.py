"""each video's last published event seq, and its complete event's seq

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 12:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('last_seq', sa.Integer(), nullable=False, server_default='0')
        )
        batch_op.add_column(sa.Column('end_seq', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.drop_column('end_seq')
        batch_op.drop_column('last_seq')
