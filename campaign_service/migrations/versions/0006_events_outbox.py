"""events: the outbox, webhook endpoints and their deliveries

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 05:30:00

Every state change writes an `events` row in its own transaction, numbered per stream
(`event_streams`); the relay turns each into Redis messages and `webhook_deliveries`, whose every
try is a `webhook_attempts` row. A user's legacy `users.webhook_url` becomes an endpoint (with a
fresh secret) so nobody stops receiving events.
"""

import base64
import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'event_streams',
        sa.Column('stream', sa.Text(), primary_key=True),
        sa.Column('last_seq', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('progress_at', sa.DateTime(timezone=True)),
    )
    op.create_table(
        'events',
        sa.Column('id', sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column('user_id', pg.UUID(as_uuid=True), nullable=False),
        sa.Column('stream', sa.Text(), nullable=False),
        sa.Column('seq', sa.BigInteger(), nullable=False),
        sa.Column('type', sa.Text(), nullable=False),
        sa.Column('data', pg.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column('relayed_at', sa.DateTime(timezone=True)),
        sa.UniqueConstraint('stream', 'seq', name='uq_events_stream_seq'),
    )
    op.create_index('ix_events_unrelayed', 'events', ['id'], postgresql_where=sa.text('relayed_at IS NULL'))
    op.create_index('ix_events_user', 'events', ['user_id', 'id'])
    op.create_table(
        'webhook_endpoints',
        sa.Column('id', pg.UUID(as_uuid=True), primary_key=True),
        sa.Column('user_id', pg.UUID(as_uuid=True), sa.ForeignKey('users.id'), nullable=False, index=True),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('description', sa.Text(), nullable=False, server_default=''),
        sa.Column('event_types', pg.ARRAY(sa.Text()), nullable=False, server_default=sa.text("'{}'::text[]")),
        sa.Column('enabled', sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column('disabled_reason', sa.Text(), nullable=False, server_default=''),
        sa.Column('secret', sa.Text(), nullable=False),
        sa.Column('previous_secret', sa.Text()),
        sa.Column('previous_secret_expires_at', sa.DateTime(timezone=True)),
        sa.Column('failing_since', sa.DateTime(timezone=True)),
        sa.Column('version', sa.Integer(), nullable=False, server_default='1'),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column('endpoint_id', pg.UUID(as_uuid=True), sa.ForeignKey('webhook_endpoints.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('event_id', sa.BigInteger(), sa.ForeignKey('events.id', ondelete='CASCADE'), nullable=False),
        sa.Column('stream', sa.Text(), nullable=False),
        sa.Column('state', sa.SmallInteger(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column('last_status_code', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('last_error', sa.Text(), nullable=False, server_default=''),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index('ix_deliveries_open', 'webhook_deliveries', ['endpoint_id', 'stream', 'id'],
                    postgresql_where=sa.text('state = 1'))
    op.create_index('ix_deliveries_endpoint', 'webhook_deliveries', ['endpoint_id', 'id'])
    op.create_table(
        'webhook_attempts',
        sa.Column('id', sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column('delivery_id', sa.BigInteger(), sa.ForeignKey('webhook_deliveries.id', ondelete='CASCADE'),
                  nullable=False, index=True),
        sa.Column('attempted_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column('status_code', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('latency_ms', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('error', sa.Text(), nullable=False, server_default=''),
    )
    op.add_column('audit_log', sa.Column('actor', sa.Text(), nullable=False, server_default=''))
    op.create_index('ix_audit_user_time', 'audit_log', ['user_id', 'id'])
    conn = op.get_bind()
    for user_id, url in conn.execute(sa.text("SELECT id, webhook_url FROM users WHERE coalesce(webhook_url, '') <> ''")):
        secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
        conn.execute(sa.text("""
            INSERT INTO webhook_endpoints (id, user_id, url, description, secret)
            VALUES (gen_random_uuid(), :u, :url, 'migrated from users.webhook_url', :s)"""),
            {"u": user_id, "url": url, "s": secret})


def downgrade() -> None:
    op.drop_index('ix_audit_user_time', table_name='audit_log')
    op.drop_column('audit_log', 'actor')
    op.drop_table('webhook_attempts')
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_endpoints')
    op.drop_table('events')
    op.drop_table('event_streams')
