"""What an event looks like outside: the one JSON shape sent to webhooks and Redis.

Webhook body (Standard Webhooks' recommended envelope):
    {"type": "campaign.paused", "timestamp": "2026-12-04T05:00:00.123456+00:00",
     "data": {"event_id": 41, "stream": "campaign:<id>", "seq": 7, "campaign_id": "<id>",
              "user_id": "<id>", "state": "PAUSED", "reason": "...", ...}}
Redis keeps the seed's flat status document (event "campaign.status", campaign_id, user_id,
state, reason, ts) and adds type, stream, seq and event_id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

STATUS_CHANNEL = "whago:campaign-status"
EVENTS_CHANNEL = "whago:events"


def campaign_channel(campaign_id: str) -> str:
    return f"whago:campaign:{campaign_id}:status"


@dataclass(frozen=True)
class EventRow:
    id: int
    user_id: Any
    stream: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, r: Any) -> EventRow:
        """From a row (or ORM object) with the events table's columns."""
        return cls(r.id, r.user_id, r.stream, r.seq, r.type, r.data, r.created_at)

    @property
    def webhook_id(self) -> str:
        """Stable across retries and redeliveries: receivers de-duplicate on it."""
        return f"evt_{self.id}"

    def envelope_data(self) -> dict[str, Any]:
        return {**self.data, "event_id": self.id, "stream": self.stream, "seq": self.seq}


def webhook_body(ev: EventRow) -> bytes:
    return json.dumps({"type": ev.type, "timestamp": ev.created_at.isoformat(), "data": ev.envelope_data()},
                      separators=(",", ":"), default=str).encode()


def redis_messages(ev: EventRow) -> list[tuple[str, str]]:
    """(channel, message) pairs: every event on whago:events; campaign events also on the seed's
    two status channels."""
    doc = {"event": "campaign.status", "type": ev.type, "ts": ev.created_at.timestamp(), **ev.envelope_data()}
    body = json.dumps(doc, default=str)
    out = [(EVENTS_CHANNEL, body)]
    if ev.stream.startswith("campaign:"):
        cid = ev.stream.split(":", 1)[1]
        out += [(STATUS_CHANNEL, body), (campaign_channel(cid), body)]
    return out
