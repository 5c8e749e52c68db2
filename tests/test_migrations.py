"""Alembic migrations run both ways on a fresh database (0003 and 0005 build indexes CONCURRENTLY)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from campaign_service.db.migrate import alembic_config, upgrade
from devstack.servers import Postgres


def _names(url: str, sql: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text(sql)).scalars())
    finally:
        engine.dispose()


def _indexes(url: str) -> set[str]:
    return _names(url, "SELECT indexname FROM pg_indexes WHERE tablename = 'campaign_messages'")


def _lane_columns(url: str) -> set[str]:
    return _names(url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'delivery_lanes'")


def test_upgrade_downgrade_upgrade(postgres: Postgres) -> None:
    postgres.create_database("whago_migrations")
    url = postgres.url("whago_migrations")
    upgrade(url)
    assert {"ix_messages_lease_expiry", "ix_messages_waha_id"} <= _indexes(url)
    assert {"resume_at", "resume_epoch"} <= _lane_columns(url)
    command.downgrade(alembic_config(url), "0002")
    assert not {"ix_messages_lease_expiry", "ix_messages_waha_id"} & _indexes(url)
    assert "ix_messages_lane" in _indexes(url)
    assert not {"resume_at", "resume_epoch"} & _lane_columns(url)
    upgrade(url)
    assert {"ix_messages_lease_expiry", "ix_messages_waha_id"} <= _indexes(url)
    assert {"resume_at", "resume_epoch"} <= _lane_columns(url)
