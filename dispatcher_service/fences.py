"""Stop fences (guarantee 1: once Pause/Cancel returns, WAHA gets no further request for the campaign).

`whago:fence:{campaign}` holds "run:{epoch}" while lanes of that epoch may talk to WAHA and
"stop:{epoch}" after a stop. Before EVERY WAHA request a lane atomically checks the fence and
registers the request as in flight (zset token -> expiry); it removes the token when the HTTP
request ends. `stop` flips the fence, then waits until no unexpired in-flight token remains,
bounded by the WAHA timeout plus a margin. "In flight" means the HTTP request only, never the
lane's later ReportDeliveries (the campaign service may hold a row lock while it waits for us).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from dispatcher_service import keys, scripts
from dispatcher_service.redis_batch import RedisBatch, run_script, run_script_undoable

FENCE_TTL_SECONDS = 7 * 86400



def _s(v: bytes | str | object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def run_value(epoch: int) -> str:
    return f"run:{epoch}"


@dataclass(frozen=True)
class FenceState:
    mode: str  # "run", "stop" or "" (none)
    epoch: int


def parse(raw: bytes | str | None) -> FenceState:
    if raw is None:
        return FenceState("", 0)
    s = raw.decode() if isinstance(raw, bytes) else raw
    mode, _, e = s.partition(":")
    try:
        return FenceState(mode, int(e))
    except ValueError:
        return FenceState("", 0)


class Stopped(Exception):
    """The lane's epoch is no longer current: it must not talk to WAHA again."""


class StaleEpoch(Exception):
    """A newer dispatch epoch owns the campaign's fence: a run or stop of an older one is refused."""

    def __init__(self, campaign_id: str, epoch: int, current: str) -> None:
        super().__init__(f"{campaign_id}: epoch {epoch} is older than {current}")
        self.campaign_id, self.epoch, self.current = campaign_id, epoch, current


class Fences:
    """Fence checks, in-flight registration and confirmed stops."""

    def __init__(self, redis: Redis, batch: RedisBatch | None = None) -> None:
        self.redis = redis
        # A worker's lanes take their per-send steps through one batcher (redis_batch.py).
        self.batch = batch
        self._acquire = scripts.register(redis, "fence_acquire")
        self._release_send = scripts.register(redis, "fence_release_send")
        self._pending = scripts.register(redis, "fence_pending")
        self._set = scripts.register(redis, "fence_set")

    async def get(self, campaign_id: str) -> FenceState:
        return parse(await self.redis.get(keys.fence(campaign_id)))

    async def is_current(self, campaign_id: str, epoch: int) -> bool:
        """True while lanes of `epoch` may run (for waits and loop checks; sends use `acquire`)."""
        raw = await (self.batch or self.redis).get(keys.fence(campaign_id))
        return raw is not None and (raw.decode() if isinstance(raw, bytes) else raw) == run_value(epoch)

    async def set(self, campaign_id: str, mode: str, epoch: int, ttl: int = FENCE_TTL_SECONDS) -> str:
        """Move the fence under the epoch rules; returns 'new', 'same' or 'stale:<current>'."""
        r = await self._set(keys=[keys.fence(campaign_id)], args=[mode, epoch, ttl])
        return r.decode() if isinstance(r, bytes) else str(r)

    async def acquire(self, campaign_id: str, epoch: int, request_ttl: float,
                      pace_chip: str | None = None, min_gap: float = 0.0,
                      owner: tuple[str, str] | None = None) -> str | float:
        """Atomically: fence still run:epoch -> register an in-flight token and return it.

        With `pace_chip`, also enforce the chip's minimum gap since the end of its last send (and
        no other send of the chip in flight): returns the seconds to wait (float) instead of a token
        when it is too early. Release such a token with `release(..., pace_chip=...)`.
        With `owner` (lane key, owner token), also that the lane was not taken over (fence_ok).
        Raises Stopped when the fence moved or the lane has another owner.
        """
        token = uuid.uuid4().hex
        ks = [keys.fence(campaign_id), keys.inflight(campaign_id)]
        if pace_chip is not None:
            ks.append(keys.pace(pace_chip))
        rv = run_value(epoch)
        if owner is not None:
            ks.append(owner[0])
            rv = f"{rv}#{owner[1]}"
        r = await run_script_undoable(  # a caller cancelled after the script ran releases the token it took
            self._acquire, ks, [rv, token, request_ttl, min_gap], self.batch,
            lambda got: self.release(campaign_id, token, pace_chip) if _s(got) == "ok" else None)
        s = _s(r)
        if s == "ok":
            return token
        if s.startswith("wait:"):
            return max(0.0, float(s[5:]))
        raise Stopped(campaign_id)

    async def release(self, campaign_id: str, token: str, pace_chip: str | None = None) -> None:
        """The HTTP request ended: it no longer holds a stop back. With `pace_chip` (a send), the
        chip's pace is measured from now (the end of the send) and the chip is free again."""
        if pace_chip is None:
            await self.redis.zrem(keys.inflight(campaign_id), token)
        else:
            await run_script(self._release_send, [keys.inflight(campaign_id), keys.pace(pace_chip)], [token],
                             self.batch)

    def release_send_nowait(self, campaign_id: str, token: str, pace_chip: str) -> asyncio.Future[object]:
        """release(..., pace_chip) queued in this tick's batch without waiting for it (a worker's
        lanes): a stop draining the campaign sees it one loop iteration after the answer came."""
        ks, args = [keys.inflight(campaign_id), keys.pace(pace_chip)], [token]
        if self.batch is None:
            return asyncio.ensure_future(self._release_send(keys=ks, args=args))
        return self.batch.script_nowait(self._release_send, ks, args)

    async def pending(self, campaign_id: str) -> int:
        return int(await self._pending(keys=[keys.inflight(campaign_id)]))

    async def wait_idle(self, campaign_id: str, timeout: float, poll: float = 0.005) -> bool:
        """Wait until no unexpired in-flight token remains; False if `timeout` ran out first.
        Polled every 5 ms (one script call): with 20 ms it added ~10 ms on average to every stop
        that found a request in flight, for a wait that lasts only while one is."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / poll) + 2):
            if await self.pending(campaign_id) == 0:
                return True
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(poll)
        return await self.pending(campaign_id) == 0

    async def run(self, campaign_id: str, epoch: int) -> str:
        """Fence to run:epoch (a new dispatch); 'new' or 'same'. Raises StaleEpoch."""
        res = await self.set(campaign_id, "run", epoch)
        if res.startswith("stale:"):
            raise StaleEpoch(campaign_id, epoch, res[6:])
        return res

    async def stop(self, campaign_id: str, epoch: int, timeout: float,
                   alongside: Callable[[], Awaitable[object]] | None = None) -> tuple[str, bool]:
        """Guarantee 1's stop: fence to stop:epoch (from then on no lane passes `acquire`), then await
        the in-flight requests, at most `timeout` seconds, while `alongside` runs (revoking queued
        jobs, marking lanes: none of it needs the drain, and the drain is what a stop mostly waits
        for). Returns (set result 'new' or 'same', drained). Raises StaleEpoch, or what `alongside`
        raised (after the drain)."""
        res = await self.set(campaign_id, "stop", epoch)
        if res.startswith("stale:"):
            raise StaleEpoch(campaign_id, epoch, res[6:])
        if alongside is None:
            return res, await self.wait_idle(campaign_id, timeout)
        drained, side = await asyncio.gather(self.wait_idle(campaign_id, timeout), alongside(),
                                             return_exceptions=True)
        for outcome in (drained, side):
            if isinstance(outcome, BaseException):
                raise outcome
        return res, bool(drained)
