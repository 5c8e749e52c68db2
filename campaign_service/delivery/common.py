"""Shared constants and helpers of the delivery package."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from campaign_service import errors
from campaign_service.ids import parse_uuid  # noqa: F401 - re-exported for the delivery modules
from campaign_service.states import CampaignState, ChipState, MessageState

# Short names for the generated enums' values (campaign_service.states), as the delivery SQL uses them.
DRAFT, SCHEDULED, RUNNING, PAUSED, CANCELLED, COMPLETED = (
    CampaignState.DRAFT, CampaignState.SCHEDULED, CampaignState.RUNNING, CampaignState.PAUSED,
    CampaignState.CANCELLED, CampaignState.COMPLETED)
PENDING, SENDING, SENT, DELIVERED, READ, FAILED, SKIPPED = (
    MessageState.PENDING, MessageState.SENDING, MessageState.SENT, MessageState.DELIVERED, MessageState.READ,
    MessageState.FAILED, MessageState.SKIPPED)
CHIP_ACTIVE, CHIP_UNAVAILABLE, CHIP_RESTRICTED = ChipState.ACTIVE, ChipState.UNAVAILABLE, ChipState.RESTRICTED

# Names used in status events (the same as lifecycle.State's).
CAMPAIGN_STATE_NAMES = {int(s): s.name for s in CampaignState}

# Longest wait for a row lock on the campaigns row (Pause/Cancel hold it FOR UPDATE while they
# call the dispatcher, which may be waiting for the very lane that is calling us).
LOCK_TIMEOUT = "5s"

COUNTERS = ("pending_count", "sent_count", "delivered_count", "read_count", "failed_count", "skipped_count")


def counter_contribution(state: int) -> dict[str, int]:
    """Which counters a message in `state` adds 1 to (see the package docstring)."""
    return {
        "pending_count": int(state in (PENDING, SENDING)),
        "sent_count": int(state in (SENT, DELIVERED, READ)),
        "delivered_count": int(state in (DELIVERED, READ)),
        "read_count": int(state == READ),
        "failed_count": int(state == FAILED),
        "skipped_count": int(state == SKIPPED),
    }


def counter_deltas(transitions: list[tuple[int, int]]) -> dict[str, int]:
    """Counter changes for a list of (old state, new state) message transitions (counted per
    distinct pair: a report of hundreds holds one or two kinds of transition)."""
    out = dict.fromkeys(COUNTERS, 0)
    for (old, new), n in Counter(transitions).items():
        if old == new:
            continue
        a, b = counter_contribution(old), counter_contribution(new)
        for k in COUNTERS:
            out[k] += n * (b[k] - a[k])
    return out


def is_lock_timeout(exc: BaseException) -> bool:
    """True for PostgreSQL's lock_not_available (55P03), raised when LOCK_TIMEOUT expires."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and getattr(orig, "pgcode", None) == "55P03"


@contextmanager
def bounded_lock_wait(what: str) -> Iterator[None]:
    """Turn a lock timeout into UNAVAILABLE with a retry hint (the caller's transaction is lost)."""
    try:
        yield
    except DBAPIError as exc:
        if is_lock_timeout(exc):
            raise errors.Unavailable(f"{what}: the campaign is changing state, retry shortly") from exc
        raise


def set_lock_timeout(session: Session) -> None:
    """Bound row-lock waits for the rest of the transaction (see LOCK_TIMEOUT)."""
    session.execute(text("SELECT set_config('lock_timeout', :lt, true)"), {"lt": LOCK_TIMEOUT})


# For a first statement that locks: `SELECT {SET_LOCK_TIMEOUT}, ... FOR ...` saves a round trip; the
# target list is evaluated before the row lock is taken, so the timeout applies to that very lock.
SET_LOCK_TIMEOUT = "set_config('lock_timeout', :lock_timeout, true) AS _lt"


def lock_timeout_param() -> dict[str, str]:
    return {"lock_timeout": LOCK_TIMEOUT}


@dataclass
class StatusEvent:
    """An automatic campaign move (its event is already in the outbox)."""

    user_id: uuid.UUID
    campaign_id: str
    state: int
    reason: str
    extra: dict[str, object] = field(default_factory=dict)
