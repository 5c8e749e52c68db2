"""WatchCampaign's snapshot: the campaign as it stands, its event sequence number, and its send rate
(from the campaign.progress events of the last minute, so a thousand watchers connecting cost no
scan of the campaign's messages)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from campaign_service import errors, outbox
from campaign_service.ids import parse_uuid
from campaign_service.ops.base import OpsBase
from campaign_service.relay.payloads import EventRow
from campaign_service.repository import campaigns as campaigns_repo
from campaign_service.states import CampaignState

RATE_WINDOW = timedelta(seconds=60)
FINAL_STATES = (CampaignState.COMPLETED, CampaignState.CANCELLED)

_LAST_SEQ = text("SELECT last_seq FROM event_streams WHERE stream = :s")
_RECENT_PROGRESS = text(f"""
    SELECT created_at, (data->>'sent_count')::bigint AS sent FROM events
    WHERE stream = :s AND type = '{outbox.CAMPAIGN_PROGRESS}'
    ORDER BY seq DESC LIMIT 120""")
_RANGE = text("""
    SELECT id, user_id, stream, seq, type, data, created_at FROM events
    WHERE stream = :s AND seq > :after AND seq <= :upto ORDER BY seq""")


@dataclass(frozen=True)
class Snapshot:
    view: campaigns_repo.CampaignView
    stream: str
    seq: int
    rate_per_minute: float
    eta_seconds: float | None

    @property
    def final(self) -> bool:
        return self.view.state in FINAL_STATES


class WatchOps(OpsBase):
    def snapshot(self, user_id: uuid.UUID, campaign_id: str) -> Snapshot:
        cid = parse_uuid(campaign_id, "campaign_id")
        stream = outbox.campaign_stream(cid)
        with self.db.session() as s:
            # The sequence number first: an event committing between the two reads is then both
            # in the view and streamed after it (shown twice, never missed).
            seq = int(s.execute(_LAST_SEQ, {"s": stream}).scalar() or 0)
            view = campaigns_repo.get_view(self.db, user_id, cid)
            if view is None:
                raise errors.NotFound("campaign", str(cid))
            progress = s.execute(_RECENT_PROGRESS, {"s": stream}).all()
        now = datetime.now(UTC)
        window = [p for p in progress if p.created_at >= now - RATE_WINDOW and p.sent is not None]
        rate = 0.0
        if window and view.state == CampaignState.RUNNING:
            oldest = window[-1]
            span = (now - oldest.created_at).total_seconds()
            if span > 0:
                rate = max(0.0, (view.sent_count - oldest.sent) / span * 60)
        eta = view.pending_count / rate * 60 if rate > 0 else None
        return Snapshot(view, stream, seq, rate, eta)

    def events(self, stream: str, after: int, upto: int) -> list[EventRow]:
        """A stream's events in (after, upto], for a watcher of a campaign that is already final."""
        with self.db.session() as s:
            return [EventRow.of(r) for r in s.execute(_RANGE, {"s": stream, "after": after, "upto": upto})]
