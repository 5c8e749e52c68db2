"""Group commit of calls per key within a worker process: a few calls in flight per key at most
(one for reports, two for leases); items submitted meanwhile go together in the next call.

What a lane asks of DeliveryService (a lease, a report) is one transaction on the campaign side,
with a fixed cost (an RPC, a commit's WAL flush) that a thousand lanes paid a thousand times. Here
each caller still gets its own answer (or the error of the call that carried its item)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")

# send(key, items, budget) -> one result per item, in order. budget: the smallest of the items' (None: the default).
Send = Callable[[K, list[I], float | None], Awaitable[Sequence[R]]]
_Pending = tuple[I, float | None, asyncio.Future[R]]


class GroupCommit(Generic[K, I, R]):
    """Up to `in_flight` calls per key at once (each a drain task taking what waits when it is
    free); a call carries at most `max_items` items whose `size` adds up to at most `max_size` (a
    single larger item goes alone). What waits adding up to less than `linger_below` waits
    `linger` seconds more for company before it goes."""

    def __init__(self, send: Send[K, I, R], size: Callable[[I], int], max_size: int, max_items: int,
                 in_flight: int = 1, linger: float = 0.0, linger_below: int = 0) -> None:
        self._send = send
        self.linger = linger
        self.linger_below = linger_below
        self._size = size
        self.max_size = max_size
        self.max_items = max_items
        self.in_flight = in_flight
        self._queues: dict[K, list[_Pending[I, R]]] = {}
        self._drains: dict[K, int] = {}  # drain tasks running per key
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: I, budget: float | None = None) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((item, budget, fut))
        if self._drains.get(key, 0) < self.in_flight:
            self._drains[key] = self._drains.get(key, 0) + 1
            t = asyncio.ensure_future(self._drain(key))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return await fut

    def _take(self, q: list[_Pending[I, R]]) -> list[_Pending[I, R]]:
        batch: list[_Pending[I, R]] = []
        n = 0
        while q and len(batch) < self.max_items and (not batch or n + self._size(q[0][0]) <= self.max_size):
            item = q.pop(0)
            batch.append(item)
            n += self._size(item[0])
        return batch

    async def _drain(self, key: K) -> None:
        batch: list[_Pending[I, R]] = []
        try:
            for _ in range(1_000_000):
                q = self._queues.get(key)
                if not q:
                    break
                if self.linger > 0 and sum(self._size(i) for i, _, _ in q) < self.linger_below:
                    await asyncio.sleep(self.linger)  # a small call: let more join it
                    q = self._queues.get(key)
                    if not q:
                        continue  # another drain of the key took them meanwhile
                batch = self._take(q)
                if not q:
                    self._queues.pop(key, None)
                budgets = [b for _, b, _ in batch if b is not None]
                try:
                    results = await self._send(key, [i for i, _, _ in batch], min(budgets) if budgets else None)
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for {len(batch)} items")
                except asyncio.CancelledError:
                    raise
                except BaseException as e:
                    for _, _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    batch = []
                    continue
                for (_, _, f), r in zip(batch, results, strict=False):
                    if not f.done():
                        f.set_result(r)
                batch = []
        finally:
            left = self._drains[key] - 1
            if left:
                self._drains[key] = left
            else:
                del self._drains[key]
            for _, _, f in batch + ([] if left else self._queues.pop(key, [])):
                if not f.done():
                    f.cancel()
