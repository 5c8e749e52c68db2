"""delivery lanes: per-lane liveness for the watchdog; partial index on RUNNING campaigns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:30:00

`delivery_lanes` holds one row per (campaign, chip) lane: when it last leased (or was restarted
by the watchdog). The watchdog restarts the dispatch of a RUNNING campaign whose lanes have all
gone quiet while work is left (guarantee 3). It is a separate table so that leasing never has
to write the campaigns row (which Pause/Cancel lock FOR UPDATE and reports update).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'delivery_lanes',
        sa.Column('campaign_id', sa.UUID(), sa.ForeignKey('campaigns.id', ondelete='CASCADE'), nullable=False),
        sa.Column('chip_id', sa.UUID(), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('lease_seconds', sa.Integer(), server_default='0', nullable=False),
        sa.Column('lease_owner', sa.Text(), server_default='', nullable=False),
        sa.PrimaryKeyConstraint('campaign_id', 'chip_id'),
    )
    op.create_index('ix_campaigns_running', 'campaigns', ['id'], unique=False,
                    postgresql_where=sa.text('state = 3'))


def downgrade() -> None:
    op.drop_index('ix_campaigns_running', table_name='campaigns', postgresql_where=sa.text('state = 3'))
    op.drop_table('delivery_lanes')
