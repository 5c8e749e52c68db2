"""campaigns.variable_names: the columns its imported contacts carry (template variables)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 06:00:00

Kept by ImportContacts, so validating a template's variables never scans the contacts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('campaigns', sa.Column('variable_names', pg.ARRAY(sa.Text()), nullable=False,
                                         server_default=sa.text("'{}'::text[]")))
    op.execute("""
        UPDATE campaigns c SET variable_names = k.names
        FROM (SELECT campaign_id, array_agg(DISTINCT key ORDER BY key) AS names
              FROM campaign_contacts, jsonb_object_keys(variables) AS key GROUP BY campaign_id) k
        WHERE k.campaign_id = c.id""")


def downgrade() -> None:
    op.drop_column('campaigns', 'variable_names')
