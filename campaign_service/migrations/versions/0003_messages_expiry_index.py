"""messages: partial index on the lease expiry of SENDING messages

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 21:30:00

Every LeaseMessages first looks for the lane's expired leases (a crashed lane's messages go
first). Without this index PostgreSQL found them by walking every SENDING entry of the campaign
(ix_messages_campaign_state, then the chip and the expiry as a filter): 2,000-3,000 entries and
0.9-5 ms of a 200-message lease at full speed, to find none. The index holds SENDING rows only, so
a report (SENDING -> SENT) adds nothing to it; a lease adds one entry per message.
Measured on the bench stack: lease statements ~330 -> ~235 ms of PostgreSQL time per 10k messages.

Built CONCURRENTLY (outside the migration's transaction): campaign_messages is the hot table, and
a plain CREATE INDEX would block its writes for the whole build.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index('ix_messages_lease_expiry', 'campaign_messages', ['campaign_id', 'chip_id', 'lease_expires_at'],
                        unique=False, postgresql_where=sa.text('state = 2'), postgresql_concurrently=True,
                        if_not_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('ix_messages_lease_expiry', table_name='campaign_messages', postgresql_concurrently=True,
                      if_exists=True)
