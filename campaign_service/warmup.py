"""Chip warm-up: a new number's daily cap starts low and grows each day it sends.

The plan lives on the chip (chips.warmup, proto JSON; NULL = no warm-up, as for chips registered
before warm-up existed). New chips get DEFAULT_PLAN unless they send their own (or opt out with
`enabled: false`; WHAGO_WARMUP_DEFAULT=off makes "no plan" the default instead). The rule itself
is enforced by the dispatcher's pacing scripts (dispatcher_service/lua/warmup.lua), which count a
chip's sending days in Redis (`whago:warmup:<chip>`); GetChip reads that hash (read only) to show
today's cap, with the same formula and the same day length (WARMUP_DAY_SECONDS)."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from campaign_service import errors
from whago.campaign.v1 import resources_pb2 as res

DEFAULT_START = 20
DEFAULT_FACTOR = 1.5
DEFAULT_MAX = 1000  # when the chip's pacing has no max_per_day
MAX_FACTOR = 10.0
MAX_CAP = 1_000_000

Violation = tuple[str, str]


def key(chip_id: str) -> str:
    """The dispatcher's warm-up hash of a chip (dispatcher_service.keys.warmup)."""
    return f"whago:warmup:{chip_id}"


def day_seconds() -> float:
    """Length of a warm-up day (WARMUP_DAY_SECONDS, default 86400: UTC days); the dispatcher reads the same."""
    try:
        v = float(os.environ.get("WARMUP_DAY_SECONDS", "86400"))
    except ValueError:
        return 86400.0
    return v if v > 0 else 86400.0


def validate(plan: res.WarmupPlan, prefix: str) -> list[Violation]:
    """Field violations of a plan (0 = default for each number); a disabled plan is not checked."""
    if not plan.enabled:
        return []
    out: list[Violation] = []
    if not 0 <= plan.start_daily_cap <= MAX_CAP:
        out.append((f"{prefix}.start_daily_cap", f"must be between 1 and {MAX_CAP} (0 means {DEFAULT_START})"))
    if math.isnan(plan.growth_factor) or (plan.growth_factor != 0 and not 1.0 <= plan.growth_factor <= MAX_FACTOR):
        out.append((f"{prefix}.growth_factor",
                    f"must be between 1 and {MAX_FACTOR:g} (0 means {DEFAULT_FACTOR:g})"))
    if not 0 <= plan.max_daily_cap <= MAX_CAP:
        out.append((f"{prefix}.max_daily_cap", f"must be between 1 and {MAX_CAP} (0 means the chip's max_per_day)"))
    elif plan.max_daily_cap and plan.max_daily_cap < (plan.start_daily_cap or DEFAULT_START):
        out.append((f"{prefix}.max_daily_cap",
                    f"must be at least start_daily_cap ({plan.start_daily_cap or DEFAULT_START})"))
    return out


def resolve(plan: res.WarmupPlan | None, pacing: res.Pacing, default_on: bool) -> res.WarmupPlan | None:
    """The plan to store for a new chip, defaults filled in; None = no warm-up."""
    if plan is None:
        if not default_on:
            return None
        plan = res.WarmupPlan(enabled=True)
    if not plan.enabled:
        return res.WarmupPlan(enabled=False)
    start = plan.start_daily_cap or DEFAULT_START
    mx = plan.max_daily_cap or (pacing.max_per_day if pacing.max_per_day > 0 else DEFAULT_MAX)
    return res.WarmupPlan(enabled=True, start_daily_cap=start, growth_factor=plan.growth_factor or DEFAULT_FACTOR,
                          max_daily_cap=max(mx, start))


def cap(plan: res.WarmupPlan, k: int) -> int:
    """The cap of sending day k (1-based): min(max, floor(start * factor^(k-1))), as lua/warmup.lua."""
    try:
        v = plan.start_daily_cap * plan.growth_factor ** (max(1, k) - 1)
    except OverflowError:
        return plan.max_daily_cap
    return plan.max_daily_cap if v >= plan.max_daily_cap else math.floor(v + 1e-9)


def day_number(state: dict[str, str], now: float, day: float) -> int:
    """Today's sending-day number from the dispatcher's hash: the days over that had sends, plus one."""
    today = math.floor(now / day)
    k = 1 + int(state.get("done", "0") or 0)
    for f, n in state.items():
        if f.startswith("d:") and int(f[2:]) < today and int(n) > 0:
            k += 1
    return k


@dataclass(frozen=True)
class Today:
    """What GetChip shows: today's warm-up day (0 = no plan) and daily cap (0 = no cap)."""

    warmup_day: int
    effective_daily_cap: int


def today(plan: res.WarmupPlan | None, pacing: res.Pacing, state: dict[str, str] | None, now: float,
          day: float) -> Today:
    chip_cap = pacing.max_per_day if pacing.max_per_day > 0 else 0
    if plan is None or not plan.enabled:
        return Today(0, chip_cap)
    k = day_number(state or {}, now, day)
    c = cap(plan, k)
    return Today(k, min(c, chip_cap) if chip_cap else c)


class StateReader:
    """Reads chips' warm-up hashes from the dispatcher's Redis (lazy, one client per process)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._client: Any = None

    def _redis(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = redis.Redis.from_url(self._url, decode_responses=True, socket_timeout=3,
                                                    socket_connect_timeout=3)
            return self._client

    def read(self, chip_ids: list[str]) -> dict[str, dict[str, str]]:
        """chip id -> its hash (empty when the chip never sent). UNAVAILABLE when Redis is down."""
        if not chip_ids:
            return {}
        try:
            pipe = self._redis().pipeline(transaction=False)
            for c in chip_ids:
                pipe.hgetall(key(c))
            got = pipe.execute()
        except redis.RedisError as exc:
            raise errors.Unavailable(f"cannot read the chips' warm-up state: {exc}", retry_after_seconds=2) from exc
        return dict(zip(chip_ids, got, strict=True))

    def views(self, chips: list[tuple[str, res.WarmupPlan | None, res.Pacing]]) -> dict[str, Today]:
        """Today's warm-up day and cap of each chip (one round trip for those with a plan)."""
        ids = [c for c, plan, _ in chips if plan is not None and plan.enabled]
        states = self.read(ids)
        now, day = time.time(), day_seconds()
        return {c: today(plan, p, states.get(c), now, day) for c, plan, p in chips}
