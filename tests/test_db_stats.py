"""StatsKeeper: a bulk change of a campaign table is ANALYZEd at once, off the caller's path."""

from __future__ import annotations

from sqlalchemy import text

from campaign_service.db.engine import Database
from campaign_service.db.stats import StatsKeeper
from tests.helpers import wait_for
from tests.test_delivery_fixtures import delivery_db

__all__ = ["delivery_db"]


def analyze_count(db: Database, table: str) -> int:
    with db.read() as conn:
        return int(conn.execute(text("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = :t"),
                                {"t": table}).scalar_one())


def test_bulk_changes_are_analyzed_at_once_small_ones_and_other_tables_are_not(delivery_db: Database) -> None:
    keeper = StatsKeeper(delivery_db.engine, min_rows=100)
    try:
        before = {t: analyze_count(delivery_db, t) for t in ("campaign_messages", "campaign_contacts")}
        keeper.changed("campaign_messages", 99)  # small: left to autovacuum
        keeper.changed("campaigns", 10_000)  # not a bulk table
        assert keeper._thread is None and not keeper._due, "nothing to analyze: no thread, nothing queued"
        keeper.changed("campaign_messages", 100)
        keeper.changed("campaign_contacts", 5_000)
        wait_for(lambda: analyze_count(delivery_db, "campaign_messages") > before["campaign_messages"]
                 and analyze_count(delivery_db, "campaign_contacts") > before["campaign_contacts"],
                 timeout=10, what="both tables analyzed")
    finally:
        keeper.stop()
    keeper.changed("campaign_messages", 10_000)  # after stop: ignored, no thread left behind
    assert keeper._thread is None or not keeper._thread.is_alive()
