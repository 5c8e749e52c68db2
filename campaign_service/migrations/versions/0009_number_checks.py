"""number_checks: WAHA check-exists answers per user, so the next campaign does not ask again

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'number_checks',
        sa.Column('user_id', pg.UUID(as_uuid=True), primary_key=True),
        sa.Column('phone', sa.Text(), primary_key=True),
        sa.Column('on_whatsapp', sa.Boolean(), nullable=False),
        sa.Column('chat_id', sa.Text(), nullable=False, server_default=''),
        sa.Column('checked_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table('number_checks')
