"""cancel sweeps: a big campaign's PENDING messages failed in batches after its Cancel

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 16:30:00

CancelCampaign failed every open message in its own transaction: one UPDATE of 1M rows held the
campaign row for ~7 s of a 1M-contact Cancel (`make bench`, figure `million`). Above
WHAGO_CANCEL_INLINE_ROWS the Cancel now fails the SENDING and FAILED rows itself (the only ones a
late report can touch) and queues the PENDING ones here; campaign_service fails them a bounded
batch per transaction, walking the campaign's PENDING ids upwards from `after_id`
(repository/cancel_sweeps.py, sweeps.py). No foreign key to campaigns: a Delete never waits on a
sweep's queue row (the sweep locks the campaign row after it, a Delete before its messages), and a
sweep that finds its campaign gone drops its entry (the purge removes the rows).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'campaign_cancel_sweeps',
        sa.Column('campaign_id', pg.UUID(as_uuid=True), primary_key=True),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('after_id', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    # What is still queued is failed at once (6: FAILED, 1: PENDING): nothing stays PENDING in a cancelled campaign.
    op.execute("UPDATE campaign_messages m SET state = 6, failure_reason = s.reason, updated_at = now()"
               " FROM campaign_cancel_sweeps s WHERE m.campaign_id = s.campaign_id AND m.state = 1")
    op.drop_table('campaign_cancel_sweeps')
