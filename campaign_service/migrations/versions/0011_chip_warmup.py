"""chips.warmup: the chip's warm-up plan (proto JSON, defaults filled in)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10 06:00:00

NULL for the chips that exist already: warm-up changes nothing for them. New chips get the default
plan at registration (campaign_service/warmup.py). The sending days are counted in Redis by the
dispatcher's pacing scripts, not here.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('chips', sa.Column('warmup', pg.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column('chips', 'warmup')
