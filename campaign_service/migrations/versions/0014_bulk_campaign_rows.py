"""bulk campaign rows: no per-row foreign-key check on messages and contacts; deletes purged in batches

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 08:00:00

Profiled on the bench stack (1M contacts, fsync on): the per-row RI trigger of
campaign_messages.campaign_id was about half of StartCampaign's INSERT ... SELECT (1M
`SELECT 1 FROM campaigns ... FOR KEY SHARE`, one per message: 37 s -> 77 s under EXPLAIN ANALYZE on a
loaded host). Both writers that create these rows, StartCampaign and ImportContacts, hold the
campaign row FOR UPDATE (and no update changes campaign_id), so the check bought nothing the row
lock does not already give. Without the
constraints a big campaign's rows can also outlive its campaign row for a moment: DeleteCampaign
removes the campaign at once (NOT_FOUND everywhere) and queues its contacts and messages in
campaign_purges, which campaign_service deletes in batches (campaign_service/sweeps.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint('campaign_messages_campaign_id_fkey', 'campaign_messages', type_='foreignkey')
    op.drop_constraint('campaign_contacts_campaign_id_fkey', 'campaign_contacts', type_='foreignkey')
    op.create_table(
        'campaign_purges',
        sa.Column('campaign_id', pg.UUID(as_uuid=True), primary_key=True),
        sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    # Rows of campaigns already deleted must go before the constraints can come back.
    op.execute("DELETE FROM campaign_messages m WHERE NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = m.campaign_id)")
    op.execute("DELETE FROM campaign_contacts t WHERE NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = t.campaign_id)")
    op.drop_table('campaign_purges')
    op.create_foreign_key('campaign_contacts_campaign_id_fkey', 'campaign_contacts', 'campaigns',
                          ['campaign_id'], ['id'])
    op.create_foreign_key('campaign_messages_campaign_id_fkey', 'campaign_messages', 'campaigns',
                          ['campaign_id'], ['id'])
