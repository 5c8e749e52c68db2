"""When a failed webhook delivery is tried again: the configured schedule with jitter, or the
receiver's Retry-After when it asks for longer. Only failures that may pass are retried."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

JITTER = 0.2  # +-20 %, so endpoints that failed together do not retry in lockstep
MAX_RETRY_AFTER = 24 * 3600.0


def retryable(status: int) -> bool:
    """Timeouts and connection errors (status 0), 408, 429 and 5xx may pass on a later try; any
    other answer (4xx, a redirect we do not follow) will not."""
    return status == 0 or status in (408, 429) or status >= 500


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - (now or datetime.now(UTC))).total_seconds()), MAX_RETRY_AFTER)


def next_delay(schedule: Sequence[float], attempts: int, retry_after: float | None = None,
               rng: random.Random | None = None) -> float | None:
    """Seconds until the next try after `attempts` tries failed; None when the schedule is spent."""
    if attempts >= len(schedule):
        return None
    base = schedule[attempts]
    jittered = base * (1 + (rng or random).uniform(-JITTER, JITTER))
    return max(jittered, retry_after or 0.0)
