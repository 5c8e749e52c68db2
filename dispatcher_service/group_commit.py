"""Group commit of calls per key within a worker process: at most one call in flight per key;
items submitted meanwhile go together in the next call.

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
    """One drain task per key while items wait; a call carries at most `max_items` items whose
    `size` adds up to at most `max_size` (a single larger item goes alone)."""

    def __init__(self, send: Send[K, I, R], size: Callable[[I], int], max_size: int, max_items: int) -> None:
        self._send = send
        self._size = size
        self.max_size = max_size
        self.max_items = max_items
        self._queues: dict[K, list[_Pending[I, R]]] = {}
        self._drains: dict[K, asyncio.Task[None]] = {}

    async def submit(self, key: K, item: I, budget: float | None = None) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((item, budget, fut))
        if key not in self._drains:
            self._drains[key] = asyncio.ensure_future(self._drain(key))
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
            self._drains.pop(key, None)
            for _, _, f in batch + self._queues.pop(key, []):
                if not f.done():
                    f.cancel()
