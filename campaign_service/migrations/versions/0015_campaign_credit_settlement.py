"""credits settled per running campaign, folded into the user's row when the campaign ends

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 13:30:00

Every batch of delivery reports consumed its credits on the tenant's `users` row: one row lock per
report for all of a tenant's lanes, held to the commit. With one tenant running 1,000 lanes the
reports queued on that row (71 ms on average, up to 4.3 s under `make bench` load), lanes fell
silent, and a Cancel's credit release waited behind them. A running campaign's CONSUME and
RELEASE entries now add to `campaigns.credits_consumed_unfolded` / `credits_released_unfolded` (the
campaign row each report already locks) as they are written; the balance counts them, and they move
onto the users row when the campaign completes, is cancelled or reverted (repository/credits.py
`fold`). The columns are in no index, so counter updates stay HOT.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ('credits_consumed_unfolded', 'credits_released_unfolded'):
        op.add_column('campaigns', sa.Column(column, sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    op.execute("""
        UPDATE users u SET credits = u.credits + c.released, credits_reserved = u.credits_reserved - c.consumed - c.released
        FROM (SELECT user_id, sum(credits_consumed_unfolded) AS consumed, sum(credits_released_unfolded) AS released
              FROM campaigns GROUP BY user_id) c
        WHERE u.id = c.user_id""")
    op.drop_column('campaigns', 'credits_released_unfolded')
    op.drop_column('campaigns', 'credits_consumed_unfolded')
