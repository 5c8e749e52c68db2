"""The background half of DeleteCampaign: a thread removing the contacts and messages of deleted
campaigns (queued in campaign_purges by the Delete's transaction) one bounded batch per
transaction, so a 1M-contact Delete returns in well under 2 s and no transaction holds 2M row
locks. Safe with several replicas (each batch locks its queue row, SKIP LOCKED) and across
restarts (the queue is a table). The rows it removes belong to no campaign any more: nothing can
read, lease or send them."""

from __future__ import annotations

import logging
import time

from campaign_service.background import BackgroundLoop
from campaign_service.db.engine import Database
from campaign_service.repository import purges as purges_repo

log = logging.getLogger("campaign_service.purge")

#: Rows per transaction: ~0.1 s of PostgreSQL work, short enough not to hold the WAL or locks long.
BATCH_ROWS = 20_000
POLL_SECONDS = 1.0


class Purger(BackgroundLoop):
    """Every `poll` seconds, purge queued campaigns until the queue is empty."""

    name = "campaign-purge"

    def __init__(self, db: Database, batch: int = BATCH_ROWS, poll: float = POLL_SECONDS) -> None:
        super().__init__(poll, max_pause=16 * poll)
        self.db = db
        self.batch = batch

    def tick(self) -> bool:
        self.run_once()
        return True

    def run_once(self) -> int:
        """Purge until the queue is empty (or stop); returns the rows removed."""
        removed = 0
        started: dict[str, float] = {}
        totals: dict[str, list[int]] = {}
        while not self.stopping:
            with self.db.transaction() as s:
                step = purges_repo.purge_batch(s, self.batch)
            if step is None:
                break
            key = str(step.campaign_id)
            started.setdefault(key, time.monotonic())
            t = totals.setdefault(key, [0, 0])
            t[0] += step.messages
            t[1] += step.contacts
            removed += step.messages + step.contacts
            if step.done:
                log.info("campaign %s purged: %d messages, %d contacts in %.1fs", key, t[0], t[1],
                         time.monotonic() - started[key])
                self.db.stats.changed("campaign_messages", t[0])
                self.db.stats.changed("campaign_contacts", t[1])
        return removed
