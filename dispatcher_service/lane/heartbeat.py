"""The heartbeat of every lane a worker runs, in one task and one Redis step per round.

A running slice holds its lane lock under a short TTL and must renew it every quarter of that
(takeover.py). Each slice renewing on its own was one task, one timer and one round trip every
1.5 s per lane: with 10,000 lanes, 6,700 Redis calls a second before a single send. Here one task
renews all of them together (lane_lock_renew_many.lua, in chunks), and tells a lane whose lock is
not its own any more (taken over, expired) to stop, as its own renewal did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis

from dispatcher_service import scripts
from dispatcher_service.store import LaneLock

log = logging.getLogger("dispatcher.lane")
CHUNK = 500  # locks per script call: each call holds Redis for its run


class Heartbeats:
    """Renews registered lane locks every `every` seconds; calls `on_lost` for a lock lost."""

    def __init__(self, redis: Redis, beats_key: str, ttl_ms: int, every: float) -> None:
        self.redis = redis
        self.beats_key = beats_key
        self.ttl_ms = ttl_ms
        self.every = every
        self._locks: dict[int, tuple[LaneLock, Callable[[], None]]] = {}  # by id(lock)
        self._members: dict[str, int] = {}  # lanes (beat members) with a registered lock: how many
        self._renew = scripts.register(redis, "lane_lock_renew_many")
        self._task: asyncio.Task[None] | None = None

    def add(self, lock: LaneLock, on_lost: Callable[[], None]) -> None:
        """Keep `lock` alive from now on (its slice just took it)."""
        if id(lock) not in self._locks:
            self._members[lock.member] = self._members.get(lock.member, 0) + 1
        self._locks[id(lock)] = (lock, on_lost)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def holds(self, member: str) -> bool:
        """Is a slice of this process beating for this lane (takeover.py leaves it to us)?"""
        return member in self._members

    def remove(self, lock: LaneLock) -> None:
        """The slice lets go of its lock: no more renewals (a round in flight is ignored for it)."""
        if self._locks.pop(id(lock), None) is not None:
            self._unmember(lock.member)

    def _unmember(self, member: str) -> None:
        left = self._members.get(member, 0) - 1
        if left > 0:
            self._members[member] = left
        else:
            self._members.pop(member, None)

    async def _run(self) -> None:
        for _ in range(10_000_000):
            await asyncio.sleep(self.every)
            if not self._locks:
                return  # started again by the next add()
            await self.renew_all()

    async def renew_all(self) -> None:
        """One round: every registered lock renewed; lanes whose lock is gone are told to stop."""
        locks = [lock for lock, _ in self._locks.values()]
        for lo in range(0, len(locks), CHUNK):
            chunk = locks[lo:lo + CHUNK]
            args: list[str | int] = [self.ttl_ms]
            ks = [self.beats_key]
            for lock in chunk:
                args += [lock.owner, lock.member]
                ks += [lock.lock_key, lock.lane_key]
            try:
                got = await self._renew(keys=ks, args=args)
            except Exception as e:  # Redis hiccup: the next round tries again (the TTL is 4 rounds)
                log.warning("lane lock renewal of %d lanes failed: %s", len(chunk), e)
                continue
            for lock, ok in zip(chunk, got, strict=True):
                if int(ok) == 1:
                    continue
                held = self._locks.pop(id(lock), None)
                if held is not None and held[0] is lock:  # still registered: its slice has not let go meanwhile
                    self._unmember(lock.member)
                    held[1]()
