"""The background halves of DeleteCampaign and CancelCampaign for big campaigns: a thread that
purges the contacts and messages of deleted campaigns (queued in campaign_purges) and fails the
PENDING messages of cancelled ones (queued in campaign_cancel_sweeps), one bounded batch per
transaction, so a 1M-contact Delete or Cancel returns in well under 2 s and no transaction holds
a million row locks. Safe with several replicas (each batch locks its queue row, SKIP LOCKED) and
across restarts (the queues are tables). The rows it touches are inert: nothing can lease or send
them (their campaign is gone or CANCELLED)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from sqlalchemy.orm import Session

from campaign_service.background import BackgroundLoop
from campaign_service.db.engine import Database
from campaign_service.repository import cancel_sweeps
from campaign_service.repository import purges as purges_repo

log = logging.getLogger("campaign_service.sweeps")

#: Rows per transaction: ~0.1 s of PostgreSQL work, short enough not to hold the WAL or locks long.
BATCH_ROWS = 20_000
POLL_SECONDS = 1.0


class Step(Protocol):
    @property
    def campaign_id(self) -> uuid.UUID: ...
    @property
    def done(self) -> bool: ...
    def changes(self) -> dict[str, int]: ...


class Sweeper(BackgroundLoop):
    """Every `poll` seconds, work through both queues until they are empty."""

    name = "campaign-sweeps"

    def __init__(self, db: Database, batch: int = BATCH_ROWS, poll: float = POLL_SECONDS) -> None:
        super().__init__(poll, max_pause=16 * poll)
        self.db = db
        self.batch = batch

    def tick(self) -> bool:
        self.run_once()
        return True

    def run_once(self) -> int:
        """Both queues until empty (or stop); returns the rows purged or failed."""
        return self._drain("purged", purges_repo.purge_batch) + self._drain("cancel sweep done",
                                                                            cancel_sweeps.sweep_batch)

    def _drain(self, what: str, batch: Callable[[Session, int], Step | None]) -> int:
        rows = 0
        started: dict[uuid.UUID, float] = {}
        totals: dict[uuid.UUID, dict[str, int]] = {}
        while not self.stopping:
            with self.db.transaction() as s:
                step = batch(s, self.batch)
            if step is None:
                break
            started.setdefault(step.campaign_id, time.monotonic())
            total = totals.setdefault(step.campaign_id, {})
            for table, n in step.changes().items():
                total[table] = total.get(table, 0) + n
                rows += n
            if step.done:
                log.info("campaign %s %s: %s in %.1fs", step.campaign_id, what,
                         ", ".join(f"{n} {table}" for table, n in total.items()),
                         time.monotonic() - started[step.campaign_id])
                for table, n in total.items():
                    self.db.stats.changed(table, n)
        return rows
