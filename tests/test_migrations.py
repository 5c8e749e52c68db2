"""Alembic migrations run both ways on a fresh database (0003 builds its index CONCURRENTLY)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from campaign_service.db.migrate import alembic_config, upgrade
from devstack.servers import Postgres


def _indexes(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'campaign_messages'")).scalars())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(postgres: Postgres) -> None:
    postgres.create_database("whago_migrations")
    url = postgres.url("whago_migrations")
    upgrade(url)
    assert "ix_messages_lease_expiry" in _indexes(url)
    command.downgrade(alembic_config(url), "0002")
    assert "ix_messages_lease_expiry" not in _indexes(url)
    assert "ix_messages_lane" in _indexes(url)
    upgrade(url)
    assert "ix_messages_lease_expiry" in _indexes(url)
