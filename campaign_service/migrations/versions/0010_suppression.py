"""suppression lists, opt-out settings, inbound opt-outs, campaigns.opted_out_count

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10 06:00:00

- suppressions: a user's numbers that must not be messaged (primary key (user_id, phone): the
  lease's per-batch check and Start's join are index lookups; prefix search scans the same index).
- opt_out_settings: a user's opt-out words and confirmation text (no row: the defaults).
- inbound_opt_outs: WAHA message ids of inbound opt-outs already applied (idempotency).
- campaigns.opted_out_count: contacts of the campaign who opted out after it messaged them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'suppressions',
        sa.Column('user_id', pg.UUID(as_uuid=True), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('phone', sa.Text(), nullable=False),
        sa.Column('source', sa.SmallInteger(), nullable=False),
        sa.Column('note', sa.Text(), nullable=False, server_default=''),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.text('now()')),
        sa.PrimaryKeyConstraint('user_id', 'phone', name='pk_suppressions'),
    )
    op.create_table(
        'opt_out_settings',
        sa.Column('user_id', pg.UUID(as_uuid=True), sa.ForeignKey('users.id', ondelete='CASCADE'),
                  primary_key=True),
        sa.Column('words', pg.ARRAY(sa.Text()), nullable=False),
        sa.Column('confirmation_text', sa.Text(), nullable=False, server_default=''),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.text('now()')),
    )
    op.create_table(
        'inbound_opt_outs',
        sa.Column('waha_message_id', sa.Text(), primary_key=True),
        sa.Column('user_id', pg.UUID(as_uuid=True), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('phone', sa.Text(), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.text('now()')),
    )
    op.add_column('campaigns', sa.Column('opted_out_count', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('campaigns', 'opted_out_count')
    op.drop_table('inbound_opt_outs')
    op.drop_table('opt_out_settings')
    op.drop_table('suppressions')
