"""Sleeping lanes of a worker watch their campaign's stop fence through one poll per campaign.

A paced lane sleeps most of its slice (30-60 s between sends). It used to wake every second to read
its campaign's fence (FENCE_POLL_SECONDS): with 1,000 lanes, 1,000 wake-ups and Redis reads a second
for nothing, the worker's largest cost between sends. Here each sleep is one timer and one event;
one task reads the fences of every campaign with a sleeper (MGET, every `every` seconds) and wakes
the sleepers whose fence moved. The check stays advisory, as before: every send passes the fence
atomically (fences.py), and a Pause or Cancel also aborts the lanes' jobs; this only lets a lane
that sleeps notice a stop within a poll and give its leases back."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from dispatcher_service import keys
from dispatcher_service.fences import run_value

log = logging.getLogger("dispatcher.fence_watch")


class FenceWatch:
    def __init__(self, redis: Redis, every: float) -> None:
        self.redis = redis
        self.every = every
        # campaign id -> the events of its sleeping lanes, with the epoch each runs under
        self._sleepers: dict[str, dict[asyncio.Event, int]] = {}
        self._task: asyncio.Task[None] | None = None

    async def sleep(self, campaign_id: str, epoch: int, seconds: float, wake: asyncio.Event) -> bool:
        """Sleep `seconds`; True at once when the campaign's fence no longer runs `epoch` or when
        `wake` is set by someone else (e.g. the lane lost its lock), False when the time ran out."""
        if wake.is_set():
            return True
        sleepers = self._sleepers.setdefault(campaign_id, {})
        sleepers[wake] = epoch
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        try:
            async with asyncio.timeout(seconds):
                await wake.wait()
            return True
        except TimeoutError:
            return False
        finally:
            sleepers.pop(wake, None)
            if not sleepers and self._sleepers.get(campaign_id) is sleepers:
                del self._sleepers[campaign_id]

    async def _run(self) -> None:
        for _ in range(100_000_000):
            await asyncio.sleep(self.every)
            if not self._sleepers:
                return  # started again by the next sleep
            try:
                await self.poll()
            except Exception as e:  # Redis hiccup: the sleepers wake on their own timers; next poll retries
                log.warning("fence poll of %d campaigns failed: %s", len(self._sleepers), e)

    async def poll(self) -> None:
        """One read of every watched campaign's fence; wakes the sleepers of a moved one."""
        campaigns = list(self._sleepers)
        raw = await self.redis.mget([keys.fence(c) for c in campaigns])
        for cid, value in zip(campaigns, raw, strict=True):
            current = value.decode() if isinstance(value, bytes) else value
            for ev, epoch in list(self._sleepers.get(cid, {}).items()):
                if current != run_value(epoch):
                    ev.set()
