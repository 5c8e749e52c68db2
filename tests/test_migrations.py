"""Alembic migrations run both ways on a fresh database (0003 and 0005 build indexes CONCURRENTLY)."""

from __future__ import annotations

import subprocess
import sys

from alembic import command
from sqlalchemy import create_engine, text

from campaign_service.db.migrate import alembic_config, upgrade
from devstack.procs import REPO, service_env
from devstack.servers import Postgres, free_port


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


def test_admin_migrate_takes_the_session_url_when_one_is_set(postgres: Postgres) -> None:
    """Behind a transaction-mode pooler DATABASE_URL points at the pooler; migrations (CREATE INDEX
    CONCURRENTLY, alembic's own bookkeeping) run on WHAGO_DB_SESSION_URL, PostgreSQL itself."""
    postgres.create_database("whago_migrate_session")
    url = postgres.url("whago_migrate_session")
    env = service_env({"DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nowhere",
                       "WHAGO_DB_SESSION_URL": url})
    r = subprocess.run([sys.executable, "-m", "campaign_service.admin", "migrate"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ix_messages_lease_expiry" in _indexes(url)
