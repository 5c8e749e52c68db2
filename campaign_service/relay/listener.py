"""One PostgreSQL connection per campaign_service process, on its own thread: it LISTENs on the
outbox channel (waking the relay and the watch hub as soon as events commit, instead of polling)
and, when asked to, holds the relay leader's advisory lock. A broken connection loses the lock at
once, so a standby replica takes over; this thread reconnects with backoff."""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable

import psycopg2
from psycopg2.extensions import ISOLATION_LEVEL_AUTOCOMMIT

from campaign_service.outbox import NOTIFY_CHANNEL

log = logging.getLogger("campaign_service.relay")

#: pg advisory lock key of the relay leader ("whago" + "rly" in ASCII, any constant works).
LEADER_LOCK = 0x7768_6167_6F72_6C79
PING_SECONDS = 5.0


class Listener:
    def __init__(self, dsn: str, on_notify: Callable[[], None], on_leader: Callable[[bool], None] | None = None
                 ) -> None:
        self._dsn = dsn
        self._on_notify = on_notify
        self._on_leader = on_leader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-listener", daemon=True)
        self.leader = False

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _set_leader(self, value: bool) -> None:
        if value != self.leader:
            self.leader = value
            log.info("relay %s", "leads" if value else "stands by")
            if self._on_leader is not None:
                self._on_leader(value)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._session()
                backoff = 0.2
            except psycopg2.Error as exc:
                log.warning("outbox listener: %s (reconnecting in %.1fs)", str(exc).strip(), backoff)
            finally:
                self._set_leader(False)
            self._on_notify()  # whatever was missed while disconnected gets looked at
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _session(self) -> None:
        conn = psycopg2.connect(self._dsn, connect_timeout=3, application_name="whago-outbox-listener")
        try:
            conn.set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)
            cur = conn.cursor()
            cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._on_notify()
            idle = 0.0
            while not self._stop.is_set():
                if self._on_leader is not None and not self.leader:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                    row = cur.fetchone()
                    if row is not None and row[0]:
                        self._set_leader(True)
                        self._on_notify()
                ready, _, _ = select.select([conn], [], [], 1.0)
                if ready:
                    conn.poll()
                    if conn.notifies:
                        conn.notifies.clear()
                        self._on_notify()
                    idle = 0.0
                else:
                    idle += 1.0
                    if idle >= PING_SECONDS:  # a silent connection may be a dead one
                        cur.execute("SELECT 1")
                        idle = 0.0
        finally:
            conn.close()
