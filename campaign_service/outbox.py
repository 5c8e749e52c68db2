"""The outbox: the one place that records an event. Every state change calls `emit` inside its
own transaction, so the event commits (or not) with the change; the relay fans it out later
(Redis pub/sub, webhooks) and WatchCampaign streams tail it.

Each event belongs to a stream (`campaign:<id>`, `chip:<id>`, `webhook:<id>`) and gets the next
sequence number of that stream: the `event_streams` row lock orders concurrent writers, so
sequences have no gaps and commit in order per stream."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service.db.engine import PreparedText, execute_prepared
from campaign_service.states import CampaignState

#: Woken (NOTIFY, delivered at commit) whenever events were written: the relay and the watch hub
#: LISTEN on it instead of polling.
NOTIFY_CHANNEL = "whago_events"

CAMPAIGN_CREATED = "campaign.created"
CAMPAIGN_UPDATED = "campaign.updated"
CAMPAIGN_DELETED = "campaign.deleted"
CAMPAIGN_STARTED = "campaign.started"
CAMPAIGN_PAUSED = "campaign.paused"
CAMPAIGN_RESUMED = "campaign.resumed"
CAMPAIGN_CANCELLED = "campaign.cancelled"
CAMPAIGN_COMPLETED = "campaign.completed"
CAMPAIGN_AUTO_PAUSED = "campaign.auto_paused"
#: Start or Resume undone because the dispatcher could not be reached: state is back as before.
CAMPAIGN_REVERTED = "campaign.reverted"
CAMPAIGN_PROGRESS = "campaign.progress"
CHIP_STATE_CHANGED = "chip.state_changed"
WEBHOOK_DISABLED = "webhook.disabled"
WEBHOOK_TEST = "webhook.test"

EVENT_TYPES = frozenset({
    CAMPAIGN_CREATED, CAMPAIGN_UPDATED, CAMPAIGN_DELETED, CAMPAIGN_STARTED, CAMPAIGN_PAUSED,
    CAMPAIGN_RESUMED, CAMPAIGN_CANCELLED, CAMPAIGN_COMPLETED, CAMPAIGN_AUTO_PAUSED, CAMPAIGN_REVERTED,
    CAMPAIGN_PROGRESS,
    CHIP_STATE_CHANGED, WEBHOOK_DISABLED, WEBHOOK_TEST,
})

#: Events after which a campaign's stream carries nothing more: WatchCampaign ends there.
FINAL_CAMPAIGN_EVENTS = frozenset({CAMPAIGN_COMPLETED, CAMPAIGN_CANCELLED, CAMPAIGN_DELETED})

#: At most one campaign.progress per campaign per this many seconds.
PROGRESS_INTERVAL_SECONDS = 1.0

_NEXT_SEQ = text("""
    INSERT INTO event_streams (stream, last_seq) VALUES (:stream, 1)
    ON CONFLICT (stream) DO UPDATE SET last_seq = event_streams.last_seq + 1
    RETURNING last_seq""")
_INSERT = text("""
    INSERT INTO events (user_id, stream, seq, type, data) VALUES (:u, :stream, :seq, :type, CAST(:data AS jsonb))
    RETURNING id""")
_NOTIFY = text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')")
# Asked by every counting ReportDeliveries: prepared once per connection (db/engine.py PreparedText).
_PROGRESS_DUE = PreparedText.of("whago_progress_due", text("""
    INSERT INTO event_streams (stream, last_seq, progress_at) VALUES (:stream, 0, now())
    ON CONFLICT (stream) DO UPDATE SET progress_at = now()
    WHERE event_streams.progress_at IS NULL OR event_streams.progress_at <= now() - make_interval(secs => :gap)
    RETURNING 1"""))


def campaign_stream(campaign_id: uuid.UUID | str) -> str:
    return f"campaign:{campaign_id}"


def chip_stream(chip_id: uuid.UUID | str) -> str:
    return f"chip:{chip_id}"


def webhook_stream(endpoint_id: uuid.UUID | str) -> str:
    return f"webhook:{endpoint_id}"


def emit(session: Session, *, user_id: uuid.UUID, stream: str, type: str, data: Mapping[str, Any]) -> int:
    """Record one event in the caller's transaction; returns its id."""
    seq = session.execute(_NEXT_SEQ, {"stream": stream}).scalar_one()
    body = {**data, "seq": seq}
    event_id = session.execute(_INSERT, {"u": user_id, "stream": stream, "seq": seq, "type": type,
                                         "data": json.dumps(body, default=str)}).scalar_one()
    session.execute(_NOTIFY)
    return int(event_id)


def campaign_event(session: Session, *, user_id: uuid.UUID, campaign_id: uuid.UUID | str, type: str, state: str,
                   reason: str = "", extra: Mapping[str, Any] | None = None) -> int:
    """A campaign's state change (the seed's status event: campaign_id, user_id, state, reason)."""
    data = {"campaign_id": str(campaign_id), "user_id": str(user_id), "state": state, "reason": reason,
            **(extra or {})}
    return emit(session, user_id=user_id, stream=campaign_stream(campaign_id), type=type, data=data)


_COUNTS = text("""
    SELECT user_id, state, total_contacts, pending_count, sent_count, delivered_count, read_count,
           failed_count, skipped_count
    FROM campaigns WHERE id = :cid""")


def campaign_progress(session: Session, campaign_id: uuid.UUID) -> int | None:
    """campaign.progress with the campaign's counters, unless one went out less than
    PROGRESS_INTERVAL_SECONDS ago (messages move by the thousand: one event each would drown
    receivers)."""
    stream = campaign_stream(campaign_id)
    if execute_prepared(session, _PROGRESS_DUE, {"stream": stream, "gap": PROGRESS_INTERVAL_SECONDS}).first() is None:
        return None
    row = session.execute(_COUNTS, {"cid": campaign_id}).one_or_none()
    if row is None:
        return None
    counts = {k: int(getattr(row, k)) for k in ("total_contacts", "pending_count", "sent_count",
                                                "delivered_count", "read_count", "failed_count", "skipped_count")}
    return campaign_event(session, user_id=row.user_id, campaign_id=campaign_id, type=CAMPAIGN_PROGRESS,
                          state=CampaignState(row.state).name, extra=counts)
