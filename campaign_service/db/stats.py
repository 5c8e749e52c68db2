"""Fresh planner statistics after bulk changes.

Autovacuum analyzes a table only on its next round (naptime, 60 s by default). Right after a
campaign of 100k messages lands in a table last analyzed nearly empty (say, just after a big
Delete), the planner believes the table holds a handful of rows and picks nested loops that rescan
it once per row: a lease or a cancel then takes tens of seconds instead of milliseconds (seen in
`make bench`). So the repository code reports its bulk inserts and deletes here, and a background
thread ANALYZEs the table at once (sampling: ~0.1-0.3 s whatever the size), off the caller's
request path.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import text
from sqlalchemy.engine import Engine

log = logging.getLogger("campaign.db.stats")

TABLES = frozenset({"campaign_messages", "campaign_contacts"})
# Smaller changes are left to autovacuum: they cannot mislead the planner by orders of magnitude.
MIN_ROWS = 5_000


class StatsKeeper:
    """One daemon thread running ANALYZE for tables reported as bulk-changed (coalesced)."""

    def __init__(self, engine: Engine, min_rows: int = MIN_ROWS) -> None:
        self.engine = engine
        self.min_rows = min_rows
        self._due: set[str] = set()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def changed(self, table: str, rows: int) -> None:
        """`rows` rows of `table` were just inserted or deleted (call after commit)."""
        if table not in TABLES or rows < self.min_rows:
            return
        with self._cv:
            if self._stopped:
                return
            self._due.add(table)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="analyze", daemon=True)
                self._thread.start()
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._due and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                tables, self._due = sorted(self._due), set()
            for table in tables:  # names from TABLES only
                try:
                    with self.engine.connect() as conn:
                        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(f"ANALYZE {table}"))
                    log.info("analyzed %s after a bulk change", table)
                except Exception as e:  # statistics are an optimisation: never fail a caller over them
                    log.warning("ANALYZE %s failed: %s", table, e)
