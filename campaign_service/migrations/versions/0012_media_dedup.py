"""campaign_media.sha256 and .kind: content stored once per sha256 per user, type sniffed from the bytes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-10 06:00:00

Rows stay per campaign; rows of one user with the same content share one file (their `path`), so
deleting a row removes the file only when no other row points at it (ix_campaign_media_path).
Rows from before this revision keep sha256 NULL and kind 0 (their MIME type decides the endpoint).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('campaign_media', sa.Column('sha256', sa.Text(), nullable=True))
    op.add_column('campaign_media', sa.Column('kind', sa.SmallInteger(), nullable=False,
                                              server_default=sa.text('0')))
    op.create_index('ix_campaign_media_path', 'campaign_media', ['path'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_campaign_media_path', table_name='campaign_media')
    op.drop_column('campaign_media', 'kind')
    op.drop_column('campaign_media', 'sha256')
