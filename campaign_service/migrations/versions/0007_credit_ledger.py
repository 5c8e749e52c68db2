"""credit ledger: credit_transactions, users.credits_reserved, opening entries

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 10:00:00

Credits become a ledger (issue 14): GRANT / RESERVE / CONSUME / RELEASE entries, aggregated per
operation; users.credits (available) and the new users.credits_reserved are denormalised counters
written in the same transaction as each entry (campaign_service/repository/credits.py).

Existing databases get opening entries so that the invariant holds from the start. The old Start
debited a campaign's messages from users.credits, so a message still PENDING or SENDING was paid
for but not yet sent: it becomes a reservation. Per user, one GRANT of credits + such messages,
and per campaign that has some, one RESERVE of their number; credits_reserved = their total.
Then available = GRANT - RESERVE = credits (unchanged) and reserved = the open messages.

Kind and state numbers are written out (CreditTransactionKind GRANT=1, RESERVE=2; MessageState
PENDING=1, SENDING=2) so the migration does not change with the code.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('users', sa.Column('credits_reserved', sa.BigInteger(), server_default='0', nullable=False))
    op.create_table(
        'credit_transactions',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('user_id', postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column('campaign_id', postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column('kind', sa.SmallInteger(), nullable=False),
        sa.Column('amount', sa.BigInteger(), nullable=False),
        sa.Column('description', sa.Text(), server_default='', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_credit_tx_user', 'credit_transactions', ['user_id', sa.text('id DESC')])
    op.create_index('ix_credit_tx_campaign', 'credit_transactions', ['campaign_id', sa.text('id DESC')],
                    postgresql_where=sa.text('campaign_id IS NOT NULL'))
    op.execute("""
        CREATE TEMPORARY TABLE _open_messages AS
        SELECT c.user_id, c.id AS campaign_id, count(*) AS n
        FROM campaign_messages m JOIN campaigns c ON c.id = m.campaign_id
        WHERE m.state IN (1, 2)
        GROUP BY c.user_id, c.id""")
    op.execute("""
        INSERT INTO credit_transactions (user_id, campaign_id, kind, amount, description)
        SELECT u.id, NULL, 1, u.credits + COALESCE(o.n, 0), 'opening balance (ledger introduced, migration 0006)'
        FROM users u LEFT JOIN (SELECT user_id, sum(n) AS n FROM _open_messages GROUP BY user_id) o
             ON o.user_id = u.id
        WHERE u.credits + COALESCE(o.n, 0) <> 0
        ORDER BY u.created_at, u.id""")
    op.execute("""
        INSERT INTO credit_transactions (user_id, campaign_id, kind, amount, description)
        SELECT user_id, campaign_id, 2, n, 'messages not yet final when the ledger was introduced (migration 0006)'
        FROM _open_messages ORDER BY user_id, campaign_id""")
    op.execute("""
        UPDATE users u SET credits_reserved = o.n
        FROM (SELECT user_id, sum(n) AS n FROM _open_messages GROUP BY user_id) o WHERE o.user_id = u.id""")
    op.execute("DROP TABLE _open_messages")


def downgrade() -> None:
    # users.credits (available) is the old counter already; reservations were paid at Start before.
    op.drop_index('ix_credit_tx_campaign', table_name='credit_transactions')
    op.drop_index('ix_credit_tx_user', table_name='credit_transactions')
    op.drop_table('credit_transactions')
    op.drop_column('users', 'credits_reserved')
