"""user_limits: an operator's per-user quotas and RPC rate, over the service-wide defaults

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 06:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'user_limits',
        sa.Column('user_id', pg.UUID(as_uuid=True), sa.ForeignKey('users.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('campaigns', sa.Integer()),
        sa.Column('contacts_per_campaign', sa.Integer()),
        sa.Column('chips', sa.Integer()),
        sa.Column('rpc_per_second', sa.Float()),
    )


def downgrade() -> None:
    op.drop_table('user_limits')
