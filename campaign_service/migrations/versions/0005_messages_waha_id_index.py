"""messages: partial index on waha_message_id, for WhatsApp receipts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 22:10:00

ReportAcks (WAHA `message.ack` webhooks) finds a message by the WAHA id it was sent under. Only
rows that carry one are indexed: a campaign's messages enter it when leased (the id is chosen
before the send), not at Start. Built CONCURRENTLY: campaign_messages is the hot table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index('ix_messages_waha_id', 'campaign_messages', ['waha_message_id'], unique=False,
                        postgresql_where=sa.text('waha_message_id IS NOT NULL'), postgresql_concurrently=True,
                        if_not_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_messages_waha_id', table_name='campaign_messages', postgresql_concurrently=True,
                      if_exists=True)
