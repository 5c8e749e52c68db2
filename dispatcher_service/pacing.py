"""Per-chip send pacing shared by every worker and campaign (guarantee 4: chip pace).

One atomic Lua script reserves the chip's next send slot:
    slot = max(now, last_reserved_slot + gap)            gap ~ uniform(min, max), never fixed
then pushes it forward until the rolling hourly/daily caps and the sending window allow it.
Reservations are logged (zset) so caps count them; an unused reservation is released.
The lane sleeps until the slot; at send time fences.py re-checks the minimum gap against the
END of the chip's previous send (and that none is in flight), so a late lane cannot squeeze the
next send and the gap holds as WAHA sees it: the previous request reached WAHA before its answer
came back, and the next one leaves after the check. When the slot is due at once (no camouflage
lead), `reserve_send` reserves and passes the fence in one atomic step.
"""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.asyncio import Redis

from dispatcher_service import keys
from whago.campaign.v1 import resources_pb2

DEFAULT_MIN_SECONDS = 30.0  # WAHA's advice: random 30-60 s between messages
DEFAULT_MAX_SECONDS = 60.0
HORIZON_DAYS = 8
NO_SLOT = -1.0

# The slot computation shared by both scripts: a Lua function of (pace, plog, gap, mph, mpd, token,
# nwin, woff, now) returning the reserved slot or -1; windows are ARGV[woff + 2w], ARGV[woff + 2w + 1].
#   slot = max(now, last_reserved_slot + gap, last_actual + gap)
# `last_actual` is when the chip's previous send ENDED (fences.py), so the random gap is measured
# from the send WAHA really got, not from its plan: a late send pushes the next one back.
_SLOT_FN = """
local function reserve_slot(pace, plog, gap, mph, mpd, token, nwin, woff, now)
  redis.call('ZREMRANGEBYSCORE', plog, '-inf', now - 86401)
  local last = tonumber(redis.call('HGET', pace, 'last') or '0')
  local la = tonumber(redis.call('HGET', pace, 'last_actual') or '0')
  local slot = math.max(now, last + gap, la + gap)
  for i = 1, 64 do
    local moved = false
    if nwin >= 0 then
      local found = false
      for w = 0, nwin - 1 do
        local s, e = tonumber(ARGV[woff + 2 * w]), tonumber(ARGV[woff + 1 + 2 * w])
        if slot < e then
          if slot < s then slot = s; moved = true end
          found = true
          break
        end
      end
      if not found then return -1 end
    end
    for _, cap in ipairs({{mph, 3600}, {mpd, 86400}}) do
      local limit, span = cap[1], cap[2]
      if limit > 0 then
        local n = redis.call('ZCOUNT', plog, '(' .. (slot - span), '+inf')
        if n >= limit then
          local r = redis.call('ZRANGEBYSCORE', plog, '(' .. (slot - span), '+inf', 'WITHSCORES', 'LIMIT', n - limit, 1)
          local ns = tonumber(r[2]) + span + 0.001
          if ns > slot then slot = ns; moved = true end
        end
      end
    end
    if not moved then
      redis.call('HSET', pace, 'last', tostring(slot), 'last_prev', tostring(last), 'last_token', token)
      redis.call('ZADD', plog, slot, token)
      redis.call('EXPIRE', pace, 172800)
      redis.call('EXPIRE', plog, 172800)
      return slot
    end
  end
  return -1
end
"""

# KEYS: pace, pacelog[, lane]; ARGV: gap, mph, mpd, token, nwin, windows...
# The optional lane hash gets next_send_time (GetDispatch) in the same step.
_RESERVE = _SLOT_FN + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local slot = reserve_slot(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
                          tonumber(ARGV[5]), 6, now)
if slot < 0 then return '-1' end
if #KEYS >= 3 then redis.call('HSET', KEYS[3], 'next_send_time', tostring(slot)) end
return tostring(slot)
"""

# A lane's previous send (or burst), ended but not yet released: no longer in flight, and the chip's
# pace is measured from now (what fences' _RELEASE_SEND does; `now` is never earlier than the real
# end, so the pace only gets more conservative).
_RELEASE_PREV_FN = """
local function release_prev(pace, inflight, token, now)
  redis.call('ZREM', inflight, token)
  local la0 = tonumber(redis.call('HGET', pace, 'last_actual') or '0')
  if now > la0 then redis.call('HSET', pace, 'last_actual', tostring(now)) end
  if redis.call('HGET', pace, 'busy_token') == token then
    redis.call('HDEL', pace, 'busy_until', 'busy_token')
  end
end
"""

# Reserve a slot and, when it is due now, also pass the stop fence and take the send in one step
# (what fences.acquire does with a pace chip), saving two round trips per message at full speed.
# KEYS: pace, pacelog, lane, fence, inflight
# ARGV: gap, mph, mpd, res_token, run_value, send_token, request_ttl, min_gap, latest, prev_token, nwin,
#       windows...
# `prev_token` (or ''): the lane's previous send of this chip, ended but not yet released; it is
# released first, whatever the answer (what fences' _RELEASE_SEND does, its end time = now, which
# is never earlier than the real end: the pace only gets more conservative).
# Returns 'stop' (fence moved: nothing reserved), '-1' (no window), 'go:<slot>' (reserved AND the
# send is registered under send_token) or 'slot:<slot>' (reserved for later: sleep, then acquire).
_RESERVE_SEND = _SLOT_FN + _RELEASE_PREV_FN + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[10] ~= '' then
  release_prev(KEYS[1], KEYS[5], ARGV[10], now)
  -- tostring keeps 14 digits and may round the stored end up (< 0.1 ms): reserve from there, or
  -- the slot (>= last_actual) would look "not due yet" and the send would take the slow path.
  local stored = tonumber(tostring(now))
  if stored > now then now = stored end
end
if redis.call('GET', KEYS[4]) ~= ARGV[5] then return 'stop' end
local slot = reserve_slot(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
                          tonumber(ARGV[11]), 12, now)
if slot < 0 then return '-1' end
redis.call('HSET', KEYS[3], 'next_send_time', tostring(slot))
if slot > now or now > tonumber(ARGV[9]) then return 'slot:' .. tostring(slot) end
local mg = tonumber(ARGV[8])
if mg > 0 then
  local busy = tonumber(redis.call('HGET', KEYS[1], 'busy_until') or '0')
  local la = tonumber(redis.call('HGET', KEYS[1], 'last_actual') or '0')
  if busy > now or now < la + mg then return 'slot:' .. tostring(slot) end
end
local ttl = tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'last_actual', tostring(now), 'busy_until', tostring(now + ttl), 'busy_token', ARGV[6])
redis.call('ZADD', KEYS[5], now + ttl, ARGV[6])
redis.call('EXPIRE', KEYS[5], 3600)
return 'go:' .. tostring(slot)
"""

# Full speed (the lane's gap is always 0): pass the fence and take up to k sends in ONE step, under
# one in-flight token that the lane holds for a short burst of sequential sends. Caps and the window
# are checked for the burst as a whole; each send of it is logged for the caps (score now).
# KEYS: pace, pacelog, lane, fence, inflight
# ARGV: mph, mpd, run_value, token, request_ttl, k, prev_token, nwin, windows...
# `prev_token`: the lane's previous burst (ended, not yet released): released first, as in
# _RESERVE_SEND. Returns 'stop', '-1' (no window within the horizon), 'slot:<t>' (nothing may leave
# before t: window closed or a cap reached) or 'go:<n>' (n >= 1 sends registered under token).
_RESERVE_BURST = _RELEASE_PREV_FN + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[7] ~= '' then release_prev(KEYS[1], KEYS[5], ARGV[7], now) end
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return 'stop' end
local nwin = tonumber(ARGV[8])
if nwin >= 0 then
  local inside, nxt = false, -1
  for w = 0, nwin - 1 do
    local s, e = tonumber(ARGV[9 + 2 * w]), tonumber(ARGV[10 + 2 * w])
    if now < e then
      if now >= s then inside = true else nxt = s end
      break
    end
  end
  if not inside then
    if nxt < 0 then return '-1' end
    redis.call('HSET', KEYS[3], 'next_send_time', tostring(nxt))
    return 'slot:' .. tostring(nxt)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86401)
local n = tonumber(ARGV[6])
for _, cap in ipairs({{tonumber(ARGV[1]), 3600}, {tonumber(ARGV[2]), 86400}}) do
  local limit, span = cap[1], cap[2]
  if limit > 0 then
    local c = redis.call('ZCOUNT', KEYS[2], '(' .. (now - span), '+inf')
    if c >= limit then
      local r = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (now - span), '+inf', 'WITHSCORES', 'LIMIT', c - limit, 1)
      local ns = tonumber(r[2]) + span + 0.001
      redis.call('HSET', KEYS[3], 'next_send_time', tostring(ns))
      return 'slot:' .. tostring(ns)
    end
    n = math.min(n, limit - c)
  end
end
local members = {}
for i = 1, n do
  members[#members + 1] = now
  members[#members + 1] = ARGV[4] .. ':' .. i
end
redis.call('ZADD', KEYS[2], unpack(members))
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'last', tostring(now), 'last_actual', tostring(now), 'busy_until', tostring(now + ttl),
           'busy_token', ARGV[4])
redis.call('HSET', KEYS[3], 'next_send_time', tostring(now))
redis.call('ZADD', KEYS[5], now + ttl, ARGV[4])
redis.call('EXPIRE', KEYS[5], 3600)
redis.call('EXPIRE', KEYS[1], 172800)
redis.call('EXPIRE', KEYS[2], 172800)
return 'go:' .. tostring(n)
"""

# Give back a slot: forget it for the caps; if nobody reserved after it, roll `last` back so the
# next reservation draws a fresh random gap from the previous send instead of drifting.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'last_token') == ARGV[1] then
  local prev = redis.call('HGET', KEYS[1], 'last_prev')
  if prev then redis.call('HSET', KEYS[1], 'last', prev) end
  redis.call('HDEL', KEYS[1], 'last_token', 'last_prev')
end
return 1
"""



@dataclass(frozen=True)
class Limits:
    """Effective pacing of one lane, defaults filled in."""

    interval_min: float = DEFAULT_MIN_SECONDS
    interval_max: float = DEFAULT_MAX_SECONDS
    max_per_hour: int = 0
    max_per_day: int = 0
    window: resources_pb2.SendingWindow | None = None

    @classmethod
    def from_proto(cls, p: resources_pb2.Pacing | None) -> Limits:
        """Unset fields take WAHA's defaults (30-60 s); an unset window means around the clock."""
        if p is None:
            return cls()
        mn = p.interval_min_seconds if p.HasField("interval_min_seconds") else None
        mx = p.interval_max_seconds if p.HasField("interval_max_seconds") else None
        if mn is None and mx is None:
            mn, mx = DEFAULT_MIN_SECONDS, DEFAULT_MAX_SECONDS
        elif mn is None:
            mn = min(DEFAULT_MIN_SECONDS, mx or 0.0)
        elif mx is None:
            mx = max(DEFAULT_MAX_SECONDS, mn)
        assert mn is not None and mx is not None
        mx = max(mx, mn)
        return cls(
            interval_min=max(0.0, mn), interval_max=max(0.0, mx),
            max_per_hour=p.max_per_hour if p.HasField("max_per_hour") else 0,
            max_per_day=p.max_per_day if p.HasField("max_per_day") else 0,
            window=p.window if p.HasField("window") else None,
        )

    def gap(self, rng: random.Random | None = None) -> float:
        """A random gap, uniform in [min, max] (WAHA: never fixed timing)."""
        r = rng or random
        return r.uniform(self.interval_min, self.interval_max)

    @property
    def mean_gap(self) -> float:
        return (self.interval_min + self.interval_max) / 2


def window_intervals(w: resources_pb2.SendingWindow, now: float, days: int = HORIZON_DAYS) -> list[tuple[float, float]]:
    """Allowed [start, end) unix-second intervals of a sending window from today for `days` days."""
    try:
        tz = ZoneInfo(w.timezone) if w.timezone else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo("UTC")
    start_h = max(0, min(23, w.start_hour))
    end_h = max(start_h + 1, min(24, w.end_hour or 24))
    weekdays = set(w.weekdays) or set(range(1, 8))
    today = dt.datetime.fromtimestamp(now, tz).date()
    out: list[tuple[float, float]] = []
    for i in range(-1, days):
        d = today + dt.timedelta(days=i)
        if d.isoweekday() not in weekdays:
            continue
        s = dt.datetime.combine(d, dt.time(start_h), tz)
        e = (dt.datetime.combine(d, dt.time(0), tz) + dt.timedelta(hours=end_h)) if end_h == 24 \
            else dt.datetime.combine(d, dt.time(end_h), tz)
        ss, ee = s.timestamp(), e.timestamp()
        if ee <= now:
            continue
        if out and ss <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], ee))
        else:
            out.append((ss, ee))
    return out


@dataclass(frozen=True)
class Reservation:
    """A reserved send slot (unix seconds); `token` releases it when unused."""

    chip_id: str
    slot: float
    token: str


class Pacer:
    """Reserves send slots of chips in Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._reserve = redis.register_script(_RESERVE)
        self._reserve_send = redis.register_script(_RESERVE_SEND)
        self._release = redis.register_script(_RELEASE)
        self._reserve_burst = redis.register_script(_RESERVE_BURST)

    async def reserve(self, chip_id: str, limits: Limits, now: float | None = None,
                      gap: float | None = None, lane_key: str | None = None) -> Reservation | None:
        """The chip's next slot, or None when no window opens within the horizon.

        With `lane_key`, the lane hash's next_send_time is set in the same step."""
        token = uuid.uuid4().hex
        args = [*self._args(limits, token, gap), *self._windows(limits, now)]
        ks = [keys.pace(chip_id), keys.pace_log(chip_id)] + ([lane_key] if lane_key else [])
        raw = await self._reserve(keys=ks, args=args)
        slot = float(raw.decode() if isinstance(raw, bytes) else raw)
        if slot < 0:
            return None
        return Reservation(chip_id, slot, token)

    async def reserve_send(self, chip_id: str, limits: Limits, lane_key: str, fence_key: str, inflight_key: str,
                           run_value: str, request_ttl: float, latest: float,
                           prev_token: str | None = None) -> tuple[Reservation | None, str | None]:
        """reserve() plus, when the slot is due now (and not after `latest`, unix s), the fenced send
        registration of fences.acquire(pace_chip=...) in the same atomic step. `prev_token`: an ended
        send of this chip and campaign still to release (fences.release(..., pace_chip)); released
        first in the same step, even when the fence moved.

        Returns (reservation, send token or None); (None, None) when no window opens.
        Raises fences.Stopped when the fence moved (nothing is reserved then)."""
        from dispatcher_service.fences import Stopped

        token, send_token = uuid.uuid4().hex, uuid.uuid4().hex
        args = [*self._args(limits, token, None), run_value, send_token, request_ttl, limits.interval_min, latest,
                prev_token or "", *self._windows(limits, None)]
        raw = await self._reserve_send(keys=[keys.pace(chip_id), keys.pace_log(chip_id), lane_key, fence_key,
                                             inflight_key], args=args)
        r = raw.decode() if isinstance(raw, bytes) else str(raw)
        if r == "stop":
            raise Stopped(fence_key)
        if r == "-1":
            return None, None
        kind, _, slot = r.partition(":")
        return Reservation(chip_id, float(slot), token), (send_token if kind == "go" else None)

    async def reserve_burst(self, chip_id: str, limits: Limits, lane_key: str, fence_key: str, inflight_key: str,
                            run_value: str, request_ttl: float, k: int,
                            prev_token: str | None = None) -> tuple[str, int] | float | None:
        """For a lane whose gap is always 0: pass the fence and register up to k sends at once.

        Returns (token, n) to send n messages now under the in-flight `token` (release it with
        fences.release(..., pace_chip=chip) when the burst ends), the unix time before which nothing
        may leave (window closed, cap reached), or None when no window opens within the horizon.
        `prev_token` is released first, even when the fence moved. Raises fences.Stopped when the
        fence moved."""
        from dispatcher_service.fences import Stopped

        token = uuid.uuid4().hex
        args = [limits.max_per_hour, limits.max_per_day, run_value, token, request_ttl, max(1, k), prev_token or "",
                *self._windows(limits, None)]
        raw = await self._reserve_burst(keys=[keys.pace(chip_id), keys.pace_log(chip_id), lane_key, fence_key,
                                              inflight_key], args=args)
        r = raw.decode() if isinstance(raw, bytes) else str(raw)
        if r == "stop":
            raise Stopped(fence_key)
        if r == "-1":
            return None
        kind, _, v = r.partition(":")
        if kind == "go":
            return token, int(v)
        return float(v)

    @staticmethod
    def _args(limits: Limits, token: str, gap: float | None) -> list[str | float | int]:
        g = limits.gap() if gap is None else gap
        return [g, limits.max_per_hour, limits.max_per_day, token]

    @staticmethod
    def _windows(limits: Limits, now: float | None) -> list[str | float | int]:
        if limits.window is None:
            return [-1]
        wins = window_intervals(limits.window, now or time.time())
        out: list[str | float | int] = [len(wins)]
        for s, e in wins:
            out += [s, e]
        return out

    async def release(self, r: Reservation) -> None:
        """Give back an unused slot so it does not count against the caps."""
        await self._release(keys=[keys.pace(r.chip_id), keys.pace_log(r.chip_id)], args=[r.token])
