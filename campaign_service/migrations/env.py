"""Alembic environment: URL from DATABASE_URL (or the config's sqlalchemy.url)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from campaign_service.db.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or os.environ["DATABASE_URL"]


def run() -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
