"""Per-user quotas (campaigns, contacts per campaign, chips) and RPC rate: the service-wide defaults
from the environment, overridden per user by the operator (`admin set-limits`, table user_limits).
Going over answers RESOURCE_EXHAUSTED with a QuotaFailure (quotas) or RetryInfo (rate) detail."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service import auth, errors
from campaign_service.config import Settings

_LIMITS = text("SELECT campaigns, contacts_per_campaign, chips, rpc_per_second FROM user_limits WHERE user_id = :u")


@dataclass(frozen=True)
class Limits:
    campaigns: int
    contacts_per_campaign: int
    chips: int
    rpc_per_second: float  # 0: unlimited


def for_user(s: Session, settings: Settings, user_id: uuid.UUID) -> Limits:
    row = s.execute(_LIMITS, {"u": user_id}).one_or_none()
    return Limits(
        campaigns=row.campaigns if row is not None and row.campaigns is not None else settings.quota_campaigns,
        contacts_per_campaign=row.contacts_per_campaign if row is not None and row.contacts_per_campaign is not None
        else settings.quota_contacts_per_campaign,
        chips=row.chips if row is not None and row.chips is not None else settings.quota_chips,
        rpc_per_second=row.rpc_per_second if row is not None and row.rpc_per_second is not None
        else settings.rpc_per_second)


def check(what: str, used: int, adding: int, limit: int) -> None:
    """RESOURCE_EXHAUSTED when `used + adding` would pass `limit` (nothing is written by the caller)."""
    if used + adding > limit:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=what, description=f"the limit is {limit}, {used} used: {adding} more would pass it")
        raise errors.ResourceExhausted(f"{what} quota exceeded: {used} of {limit} used",
                                       [error_details_pb2.QuotaFailure(violations=[violation]),
                                        errors.error_info("QUOTA_EXCEEDED", {"quota": what, "limit": str(limit)})])


class RateLimiter:
    """A token bucket per user and process (each campaign_service replica has its own): `rate` calls
    a second, bursts of twice that. A user's rate comes from `rate_of` (the operator's override, or
    the default), remembered for `ttl` seconds. O(1) per call."""

    def __init__(self, rate_of: Callable[[uuid.UUID], float], ttl: float = 30.0) -> None:
        self._rate_of = rate_of
        self._ttl = ttl
        self._rates: dict[uuid.UUID, tuple[float, float]] = {}  # user -> (rate, valid until)
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}  # user -> (tokens, at)
        self._lock = threading.Lock()

    def _rate(self, user_id: uuid.UUID, now: float, cached_only: bool) -> float:
        hit = self._rates.get(user_id)
        if hit is not None and hit[1] > now:
            return hit[0]
        if cached_only:
            raise auth.NeedsLookup
        rate = self._rate_of(user_id)
        if len(self._rates) > 100_000:
            self._rates.clear()
        self._rates[user_id] = (rate, now + self._ttl)
        return rate

    def take(self, user_id: uuid.UUID, cached_only: bool = False) -> None:
        """Spend one call of the user's bucket; with `cached_only`, NeedsLookup (nothing spent)
        when the user's rate would have to be read from PostgreSQL."""
        now = time.monotonic()
        rate = self._rate(user_id, now, cached_only)
        if rate <= 0:
            return
        with self._lock:
            tokens, last = self._buckets.get(user_id, (2 * rate, now))
            tokens = min(2 * rate, tokens + (now - last) * rate)
            if tokens < 1:
                self._buckets[user_id] = (tokens, now)
                wait = (1 - tokens) / rate
                raise errors.ResourceExhausted(
                    f"rate limit: at most {rate:g} calls a second", [
                        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                            seconds=int(wait), nanos=int((wait % 1) * 1e9))),
                        errors.error_info("RATE_LIMITED", {"rate": f"{rate:g}"})])
            self._buckets[user_id] = (tokens - 1, now)
            if len(self._buckets) > 100_000:
                self._buckets.clear()
