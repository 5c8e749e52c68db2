"""Concurrent point reads on the event loop coalesced into one query (the DataLoader pattern).

Why: under load most of a GetCampaign's own cost was the round trip around its one-row query
(asyncpg's execute, the wakeups of the loop and of the PostgreSQL backend, its per-statement work),
not the row. Keys asked for while a slot is free go out together on the next turn of the loop;
while `parallel` queries are in flight, new keys wait for one of them to finish and then go out as
one batch.

Under concurrent load a batch is also held a little for company (`hold`): up to `hold` seconds
after its first key, until it has a target number of keys: at most `fill`, one fewer after a
batch that fell due, one more after four full batches in a row, so a few callers are not held for
keys that will not come. Only while the recent batches show that keys do come together (their
mean size, decaying, at least `together`): a lone caller's reads go out at once. Measured under
`make bench` get load (16 calls in flight): ~1.5 keys per query without holding, ~4-6 with it, and
the loop's CPU per call fell with the number of queries (each query costs a send, a wakeup of the
loop for the answer and PostgreSQL's per-statement work). A target fixed at 8 gave the figure ~8%
more, but two callers would then each wait the whole hold.

Every answer comes from a query that started after its key was asked for, so a read still sees
every write committed before it began (no cache, nothing stale).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`await get(key)`: the value `fetch` found for the key (None when it found none). `fetch`
    takes up to `max_batch` distinct keys and answers a dict of those it found. `get` hands back
    the waiter's future itself (no coroutine around it: it is on every GetCampaign)."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 64,
                 parallel: int = 1, hold: float = 0.0, fill: int = 8, together: float = 1.5) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._parallel = parallel
        self._hold = hold
        self._fill = min(fill, max_batch)
        self._together = together
        self._mean = 1.0  # batch size, decaying mean of the recent batches
        self._target = self._fill  # the keys a held batch waits for (see _flush)
        self._filled = 0  # held batches in a row that reached the target before they were due
        self._since = 0.0  # when the oldest pending key was asked for (loop time)
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._running = 0
        self._scheduled = False
        self._held: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, key: K) -> asyncio.Future[V | None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        if not self._pending:
            self._since = loop.time()
        self._pending.setdefault(key, []).append(fut)
        self._schedule(loop)
        return fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._scheduled or not self._pending or self._running >= self._parallel:
            return
        if self._hold and self._mean >= self._together and len(self._pending) < self._target:
            due = self._since + self._hold  # held from its first key on: flushed when full or due
            if loop.time() < due:
                if self._held is None:
                    self._held = loop.call_at(due, self._release, loop)
                return
        self._scheduled = True
        loop.call_soon(self._flush, loop)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        self._held = None
        if not self._scheduled and self._pending and self._running < self._parallel:
            self._scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        if not self._pending or self._running >= self._parallel:
            return
        if self._held is not None:
            self._held.cancel()
            self._held = None
        batch = {k: self._pending.pop(k) for k in list(itertools.islice(self._pending, self._max_batch))}
        if self._hold and self._mean >= self._together:  # a held batch: was it full, or due?
            if len(batch) < self._target:  # due: one key fewer next time
                self._target, self._filled = max(2, self._target - 1), 0
            else:
                self._filled += 1
                if self._filled >= 4:  # full four times in a row: try one more
                    self._target, self._filled = min(self._fill, self._target + 1), 0
        self._mean += (len(batch) - self._mean) / 4
        self._running += 1
        task = loop.create_task(self._run(batch))
        self._tasks.add(task)  # a reference until done, as asyncio asks
        task.add_done_callback(self._tasks.discard)
        self._schedule(loop)

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        try:
            found = await self._fetch(list(batch))
        except asyncio.CancelledError:  # shutting down: the waiters are cancelled with it
            for futs in batch.values():
                for f in futs:
                    f.cancel()
            raise
        except Exception as exc:  # every waiter of the batch gets the error (e.g. database down)
            for futs in batch.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
        else:
            for k, futs in batch.items():
                value = found.get(k)
                for f in futs:
                    if not f.done():  # a waiter whose RPC was cancelled meanwhile
                        f.set_result(value)
        finally:
            self._running -= 1
            self._schedule(asyncio.get_running_loop())
