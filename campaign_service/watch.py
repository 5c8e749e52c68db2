"""WatchCampaign's shared tail of the outbox: one query per wake-up for every stream watched in
this process, whatever the number of watchers, and no thread per watcher (they are asyncio tasks
on the server's event loop).

Cursors are per stream and by sequence number, not by outbox id: ids are taken before commit, so
a later id can commit first, while a stream's sequence commits in order (its event_streams row
lock serializes writers). A watcher therefore never skips an event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from sqlalchemy import text

from campaign_service import errors
from campaign_service.db.engine import Database
from campaign_service.relay.payloads import EventRow
from campaign_service.wakeups import woken

log = logging.getLogger("campaign_service.watch")

#: Events a watcher may lag behind before it is dropped (it can resume with after_seq).
MAX_BACKLOG = 10_000
FETCH_LIMIT = 5_000

_FETCH = text("""
    SELECT e.id, e.user_id, e.stream, e.seq, e.type, e.data, e.created_at
    FROM unnest(CAST(:streams AS text[]), CAST(:seqs AS bigint[])) AS c(stream, seq)
    JOIN events e ON e.stream = c.stream AND e.seq > c.seq
    ORDER BY e.stream, e.seq LIMIT :n""")


_CLOSED = object()


class Watcher:
    """One WatchCampaign call's queue of events, in stream order."""

    def __init__(self, stream: str, after_seq: int) -> None:
        self.stream = stream
        self.last_seq = after_seq
        self.queue: asyncio.Queue[EventRow | object | None] = asyncio.Queue()

    def close(self) -> None:
        """The server is going away: the watcher is told to reconnect (with after_seq)."""
        self.queue.put_nowait(_CLOSED)

    def offer(self, ev: EventRow) -> None:
        if ev.seq <= self.last_seq:
            return  # already had it (a re-fetch for another watcher's catch-up)
        self.last_seq = ev.seq
        if self.queue.qsize() >= MAX_BACKLOG:
            self.queue.put_nowait(None)  # too slow: ended, see next()
            return
        self.queue.put_nowait(ev)

    async def next(self) -> EventRow:
        ev = await self.queue.get()
        if ev is None:
            raise errors.ResourceExhausted(
                f"WATCHER_TOO_SLOW: more than {MAX_BACKLOG} events behind; reconnect with after_seq",
                [errors.error_info("WATCHER_TOO_SLOW")])
        if ev is _CLOSED:
            raise errors.Unavailable("the server is shutting down: reconnect with after_seq")
        assert isinstance(ev, EventRow)
        return ev


class WatchHub:
    def __init__(self, db: Database, executor: Executor) -> None:
        self._db = db
        self._executor = executor
        self._watchers: dict[str, set[Watcher]] = {}
        self._cursor: dict[str, int] = {}  # stream -> last seq fetched
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0

    @property
    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def close_all(self) -> None:
        for group in self._watchers.values():
            for w in group:
                w.close()

    def subscribe(self, stream: str, after_seq: int) -> Watcher:
        w = Watcher(stream, after_seq)
        self._watchers.setdefault(stream, set()).add(w)
        self._cursor[stream] = min(self._cursor.get(stream, after_seq), after_seq)
        self._wake.set()
        return w

    def unsubscribe(self, w: Watcher) -> None:
        group = self._watchers.get(w.stream)
        if group is None:
            return
        group.discard(w)
        if not group:
            del self._watchers[w.stream]
            self._cursor.pop(w.stream, None)

    async def _run(self) -> None:
        while True:
            await woken(self._wake, 1.0)
            if not self._cursor:
                continue
            try:
                await self._pass()
            except Exception as exc:  # database away: the next wake-up (or second) tries again
                log.warning("watch hub fetch failed: %s", exc)

    async def _pass(self) -> None:
        cursors = dict(self._cursor)
        fetch: Callable[[], list[Any]] = lambda: self._fetch(cursors)  # noqa: E731
        rows = await asyncio.get_running_loop().run_in_executor(self._executor, fetch)
        self.fetches += 1
        for r in rows:
            ev = EventRow.of(r)
            if ev.stream in self._cursor:
                self._cursor[ev.stream] = max(self._cursor[ev.stream], ev.seq)
            for w in list(self._watchers.get(ev.stream, ())):
                w.offer(ev)
        if len(rows) >= FETCH_LIMIT:
            self._wake.set()

    def _fetch(self, cursors: dict[str, int]) -> list[Any]:
        with self._db.session() as s:
            return list(s.execute(_FETCH, {"streams": list(cursors), "seqs": list(cursors.values()),
                                           "n": FETCH_LIMIT}).all())
