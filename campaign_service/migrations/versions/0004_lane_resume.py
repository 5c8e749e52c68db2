"""delivery_lanes: resume_at / resume_epoch, when a lane that holds off on purpose sends again

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 22:00:00

A lane held back by an hourly or daily cap (or a closed sending window) leases nothing until the
cap frees a slot, which the watchdog took for a stall: every `stall_seconds` it started a new
dispatch epoch and wrote an audit event. The lane now reports until when it waits
(DeliveryService.ReportLaneWait), and the watchdog leaves it alone until then plus its stall
period, for that epoch only. Two nullable columns: no table rewrite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('delivery_lanes', sa.Column('resume_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('delivery_lanes', sa.Column('resume_epoch', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column('delivery_lanes', 'resume_epoch')
    op.drop_column('delivery_lanes', 'resume_at')
