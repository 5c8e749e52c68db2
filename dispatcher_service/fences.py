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
from dataclasses import dataclass

from redis.asyncio import Redis

from dispatcher_service import keys

FENCE_TTL_SECONDS = 7 * 86400

# KEYS: fence, inflight[, pace]; ARGV: run_value, token, request_ttl, min_gap.
# With a pace key (a send): no other send of the chip may be in flight (busy_until) and `min_gap`
# must have passed since the END of the chip's previous send (last_actual, moved to the end by
# _RELEASE_SEND), so the gap holds as WAHA sees it. While a send is in flight the earliest next
# send is min_gap after it ends: the answer is 'wait:<min_gap>'.
_ACQUIRE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'stop' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
if #KEYS >= 3 then
  local mg = tonumber(ARGV[4])
  if mg > 0 then
    local busy = tonumber(redis.call('HGET', KEYS[3], 'busy_until') or '0')
    if busy > now then return 'wait:' .. tostring(mg) end
    local la = tonumber(redis.call('HGET', KEYS[3], 'last_actual') or '0')
    if now < la + mg then return 'wait:' .. tostring(la + mg - now) end
  end
  redis.call('HSET', KEYS[3], 'last_actual', tostring(now), 'busy_until', tostring(now + ttl), 'busy_token', ARGV[2])
  redis.call('EXPIRE', KEYS[3], 172800)
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('EXPIRE', KEYS[2], 3600)
return 'ok'
"""

# A send ended (answer, error or timeout): it no longer holds a stop back, and the chip's pace is
# measured from now on. KEYS: inflight, pace; ARGV: token.
_RELEASE_SEND = """
redis.call('ZREM', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local la = tonumber(redis.call('HGET', KEYS[2], 'last_actual') or '0')
if now > la then redis.call('HSET', KEYS[2], 'last_actual', tostring(now)) end
if redis.call('HGET', KEYS[2], 'busy_token') == ARGV[1] then redis.call('HDEL', KEYS[2], 'busy_until', 'busy_token') end
redis.call('EXPIRE', KEYS[2], 172800)
return 1
"""

_PENDING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# Set the fence according to the epoch rules; returns 'new', 'same' or 'stale:<current>'.
#   run E : allowed over nothing, run:<E, stop:<E; 'same' for run:E.
#   stop E: allowed over nothing, run:<=E, stop:<E; 'same' for stop:>=E; stale over run:>E.
_SET = """
local cur = redis.call('GET', KEYS[1])
local mode, e = ARGV[1], tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local function put()
  if ttl > 0 then redis.call('SET', KEYS[1], mode .. ':' .. ARGV[2], 'EX', ttl)
  else redis.call('SET', KEYS[1], mode .. ':' .. ARGV[2]) end
  return 'new'
end
if not cur then return put() end
local cm, ce = string.match(cur, '^(%a+):(%-?%d+)$')
ce = tonumber(ce)
if not cm then return put() end
if mode == 'run' then
  if cm == 'run' and ce == e then return 'same' end
  if ce < e then return put() end
  return 'stale:' .. cur
else
  if cm == 'run' and ce <= e then return put() end
  if cm == 'stop' and ce < e then return put() end
  if cm == 'stop' then return 'same' end
  return 'stale:' .. cur
end
"""


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


class Fences:
    """Fence checks, in-flight registration and confirmed stops."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._release_send = redis.register_script(_RELEASE_SEND)
        self._pending = redis.register_script(_PENDING)
        self._set = redis.register_script(_SET)

    async def get(self, campaign_id: str) -> FenceState:
        return parse(await self.redis.get(keys.fence(campaign_id)))

    async def is_current(self, campaign_id: str, epoch: int) -> bool:
        """True while lanes of `epoch` may run (for waits and loop checks; sends use `acquire`)."""
        raw = await self.redis.get(keys.fence(campaign_id))
        return raw is not None and (raw.decode() if isinstance(raw, bytes) else raw) == run_value(epoch)

    async def set(self, campaign_id: str, mode: str, epoch: int, ttl: int = FENCE_TTL_SECONDS) -> str:
        """Move the fence under the epoch rules; returns 'new', 'same' or 'stale:<current>'."""
        r = await self._set(keys=[keys.fence(campaign_id)], args=[mode, epoch, ttl])
        return r.decode() if isinstance(r, bytes) else str(r)

    async def acquire(self, campaign_id: str, epoch: int, request_ttl: float,
                      pace_chip: str | None = None, min_gap: float = 0.0) -> str | float:
        """Atomically: fence still run:epoch -> register an in-flight token and return it.

        With `pace_chip`, also enforce the chip's minimum gap since the end of its last send (and
        no other send of the chip in flight): returns the seconds to wait (float) instead of a token
        when it is too early. Release such a token with `release(..., pace_chip=...)`.
        Raises Stopped when the fence moved.
        """
        token = uuid.uuid4().hex
        ks = [keys.fence(campaign_id), keys.inflight(campaign_id)]
        if pace_chip is not None:
            ks.append(keys.pace(pace_chip))
        r = await self._acquire(keys=ks, args=[run_value(epoch), token, request_ttl, min_gap])
        s = r.decode() if isinstance(r, bytes) else str(r)
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
            await self._release_send(keys=[keys.inflight(campaign_id), keys.pace(pace_chip)], args=[token])

    async def pending(self, campaign_id: str) -> int:
        return int(await self._pending(keys=[keys.inflight(campaign_id)]))

    async def wait_idle(self, campaign_id: str, timeout: float, poll: float = 0.02) -> bool:
        """Wait until no unexpired in-flight token remains; False if `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / poll) + 2):
            if await self.pending(campaign_id) == 0:
                return True
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(poll)
        return await self.pending(campaign_id) == 0

    async def stop(self, campaign_id: str, epoch: int, timeout: float) -> tuple[str, bool]:
        """Fence to stop:epoch, then await in-flight requests. Returns (set result, drained)."""
        res = await self.set(campaign_id, "stop", epoch)
        drained = await self.wait_idle(campaign_id, timeout)
        return res, drained
