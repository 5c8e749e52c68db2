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

Chip warm-up (lua/warmup.lua): a chip with a warm-up plan (Pacing.warmup, from campaign_service)
also has a daily cap per warm-up day (floor(t / WARMUP_DAY_SECONDS), UTC days by default) that grows
with each day the chip sent: min(max, floor(start * factor^(k-1))) on its k-th sending day. Counted
in Redis by the same scripts, so it holds across campaigns and workers.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
import uuid
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.asyncio import Redis

from dispatcher_service import keys, scripts
from dispatcher_service.fences import Stopped
from dispatcher_service.redis_batch import RedisBatch, run_script, run_script_undoable
from whago.campaign.v1 import resources_pb2

DEFAULT_MIN_SECONDS = 30.0  # WAHA's advice: random 30-60 s between messages
DEFAULT_MAX_SECONDS = 60.0
HORIZON_DAYS = 8
NO_SLOT = -1.0


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def warmup_day_seconds() -> float:
    """Length of a warm-up day (WARMUP_DAY_SECONDS, default 86400: UTC days); tests shorten it."""
    try:
        v = float(os.environ.get("WARMUP_DAY_SECONDS", "86400"))
    except ValueError:
        return 86400.0
    return v if v > 0 else 86400.0


@dataclass(frozen=True)
class Limits:
    """Effective pacing of one lane, defaults filled in."""

    interval_min: float = DEFAULT_MIN_SECONDS
    interval_max: float = DEFAULT_MAX_SECONDS
    max_per_hour: int = 0
    max_per_day: int = 0
    window: resources_pb2.SendingWindow | None = None
    # Warm-up plan (0 = none): first day's cap, growth per sending day, ceiling.
    warmup_start: int = 0
    warmup_factor: float = 1.0
    warmup_max: int = 0

    @property
    def warmup(self) -> bool:
        return self.warmup_start > 0

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
        ws, wf, wm = _warmup(p)
        return cls(
            interval_min=max(0.0, mn), interval_max=max(0.0, mx),
            max_per_hour=p.max_per_hour if p.HasField("max_per_hour") else 0,
            max_per_day=p.max_per_day if p.HasField("max_per_day") else 0,
            window=p.window if p.HasField("window") else None,
            warmup_start=ws, warmup_factor=wf, warmup_max=wm,
        )

    def gap(self, rng: random.Random | None = None) -> float:
        """A random gap, uniform in [min, max] (WAHA: never fixed timing)."""
        r = rng or random
        return r.uniform(self.interval_min, self.interval_max)

    @property
    def mean_gap(self) -> float:
        return (self.interval_min + self.interval_max) / 2


def _warmup(p: resources_pb2.Pacing) -> tuple[int, float, int]:
    """The lane's warm-up plan (start, factor, max; campaign_service fills in its defaults); start 0 when off."""
    if not p.HasField("warmup") or not p.warmup.enabled or p.warmup.start_daily_cap <= 0:
        return 0, 1.0, 0
    w = p.warmup
    return w.start_daily_cap, max(1.0, w.growth_factor or 1.0), max(w.max_daily_cap, w.start_daily_cap)


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
    warmup: bool = False  # counted on the chip's warm-up day: release takes it back there too


class Pacer:
    """Reserves send slots of chips in Redis."""

    def __init__(self, redis: Redis, warmup_day: float | None = None, batch: RedisBatch | None = None) -> None:
        self.redis = redis
        self.batch = batch  # a worker's lanes reserve through one batcher (redis_batch.py)
        self.warmup_day = warmup_day or warmup_day_seconds()
        self._reserve = scripts.register(redis, "pace_reserve")
        self._reserve_send = scripts.register(redis, "pace_reserve_send")
        self._release = scripts.register(redis, "pace_release")
        self._reserve_burst = scripts.register(redis, "pace_reserve_burst")
        self._release_send = scripts.register(redis, "fence_release_send")
        self._burst_return = scripts.register(redis, "pace_burst_return")

    async def reserve(self, chip_id: str, limits: Limits, now: float | None = None,
                      gap: float | None = None, lane_key: str | None = None) -> Reservation | None:
        """The chip's next slot, or None when no window opens within the horizon.

        With `lane_key`, the lane hash's next_send_time is set in the same step."""
        token = uuid.uuid4().hex
        args = [*self._args(limits, token, gap), *self._windows(limits, now), *self._warm_args(limits)]
        ks = [keys.pace(chip_id), keys.pace_log(chip_id)] + ([lane_key] if lane_key else []) \
            + self._warm_keys(chip_id, limits)
        raw = await run_script(self._reserve, ks, args, self.batch)
        slot = float(raw.decode() if isinstance(raw, bytes) else raw)
        if slot < 0:
            return None
        return Reservation(chip_id, slot, token, limits.warmup)

    async def _end_send(self, inflight_key: str, chip_id: str, send_token: str) -> None:
        """A send registered by a reservation whose caller was cancelled: it never left (fences.release)."""
        await run_script(self._release_send, [inflight_key, keys.pace(chip_id)], [send_token], self.batch)

    async def reserve_send(self, chip_id: str, limits: Limits, lane_key: str, fence_key: str, inflight_key: str,
                           run_value: str, request_ttl: float, latest: float,
                           prev_token: str | None = None) -> tuple[Reservation | None, str | None]:
        """reserve() plus, when the slot is due now (and not after `latest`, unix s), the fenced send
        registration of fences.acquire(pace_chip=...) in the same atomic step. `prev_token`: an ended
        send of this chip and campaign still to release (fences.release(..., pace_chip)); released
        first in the same step, even when the fence moved.

        Returns (reservation, send token or None); (None, None) when no window opens.
        Raises fences.Stopped when the fence moved (nothing is reserved then)."""
        token, send_token = uuid.uuid4().hex, uuid.uuid4().hex
        args = [*self._args(limits, token, None), run_value, send_token, request_ttl, limits.interval_min, latest,
                prev_token or "", *self._windows(limits, None), *self._warm_args(limits)]
        raw = await run_script_undoable(
            self._reserve_send, [keys.pace(chip_id), keys.pace_log(chip_id), lane_key, fence_key, inflight_key,
                                 *self._warm_keys(chip_id, limits)], args, self.batch,
            lambda got: self._end_send(inflight_key, chip_id, send_token) if _s(got).startswith("go:") else None)
        r = _s(raw)
        if r == "stop":
            raise Stopped(fence_key)
        if r == "-1":
            return None, None
        kind, _, slot = r.partition(":")
        return Reservation(chip_id, float(slot), token, limits.warmup), (send_token if kind == "go" else None)

    async def reserve_burst(self, chip_id: str, limits: Limits, lane_key: str, fence_key: str, inflight_key: str,
                            run_value: str, request_ttl: float, k: int,
                            prev_token: str | None = None) -> tuple[str, int] | float | None:
        """For a lane whose gap is always 0: pass the fence and register up to k sends at once.

        Returns (token, n) to send n messages now under the in-flight `token` (release it with
        fences.release(..., pace_chip=chip) when the burst ends), the unix time before which nothing
        may leave (window closed, cap reached), or None when no window opens within the horizon.
        `prev_token` is released first, even when the fence moved. Raises fences.Stopped when the
        fence moved."""
        token = uuid.uuid4().hex
        args = [limits.max_per_hour, limits.max_per_day, run_value, token, request_ttl, max(1, k), prev_token or "",
                *self._windows(limits, None), *self._warm_args(limits)]
        raw = await run_script_undoable(
            self._reserve_burst, [keys.pace(chip_id), keys.pace_log(chip_id), lane_key, fence_key, inflight_key,
                                  *self._warm_keys(chip_id, limits)], args, None,
            lambda got: self._end_send(inflight_key, chip_id, token) if _s(got).startswith("go:") else None)
        r = _s(raw)
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

    def _warm_args(self, limits: Limits) -> list[str | float | int]:
        """The warm-up tail of a reserve script's ARGV (after the windows); none without a plan."""
        if not limits.warmup:
            return []
        return [self.warmup_day, limits.warmup_start, limits.warmup_factor, limits.warmup_max]

    @staticmethod
    def _warm_keys(chip_id: str, limits: Limits) -> list[str]:
        return [keys.warmup(chip_id)] if limits.warmup else []

    async def return_burst(self, chip_id: str, limits: Limits, token: str, used: int, n: int) -> int:
        """A burst of n registered sends that sent only `used`: the rest stop counting for the caps
        and the warm-up day (or a warm-up day would fill up with sends that never left)."""
        if used >= n:
            return 0
        if limits.warmup:
            got = await self._burst_return(keys=[keys.pace_log(chip_id), keys.warmup(chip_id)],
                                           args=[token, used, n, self.warmup_day])
        else:
            got = await self._burst_return(keys=[keys.pace_log(chip_id)], args=[token, used, n])
        return int(got)

    async def release(self, r: Reservation) -> None:
        """Give back an unused slot so it does not count against the caps (nor its warm-up day)."""
        if r.warmup:
            await self._release(keys=[keys.pace(r.chip_id), keys.pace_log(r.chip_id), keys.warmup(r.chip_id)],
                                args=[r.token, self.warmup_day])
        else:
            await self._release(keys=[keys.pace(r.chip_id), keys.pace_log(r.chip_id)], args=[r.token])
