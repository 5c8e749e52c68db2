"""Automatic campaign transitions: COMPLETED when every message is final, PAUSED when a threshold
is crossed or no chip is left. Shared by reports, chip state changes and the scheduler.

Each runs inside the caller's transaction, locks the campaign row FOR UPDATE (so it serializes
with leases, which hold it FOR KEY SHARE, and with Pause/Cancel), writes an audit row, and
returns a StatusEvent that the caller publishes once the transaction has committed."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service import audit
from campaign_service.delivery.common import (
    CAMPAIGN_STATE_NAMES,
    COMPLETED,
    PAUSED,
    PENDING,
    RUNNING,
    SENDING,
    StatusEvent,
)
from campaign_service.events import Events

log = logging.getLogger("campaign_service.delivery")

_LOCK = text("""
    SELECT c.state, c.user_id, u.webhook_url FROM campaigns c JOIN users u ON u.id = c.user_id
    WHERE c.id = :cid FOR UPDATE OF c""")

_OPEN_WORK = text(f"""
    SELECT EXISTS (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid AND state IN ({PENDING:d}, {SENDING:d}))""")


def complete_if_done(session: Session, campaign_id: uuid.UUID) -> StatusEvent | None:
    """RUNNING and no PENDING/SENDING message left -> COMPLETED with completed_at."""
    row = session.execute(_LOCK, {"cid": campaign_id}).one_or_none()
    if row is None or row.state != RUNNING:
        return None
    if session.execute(_OPEN_WORK, {"cid": campaign_id}).scalar_one():
        return None
    counts = session.execute(text("""
        UPDATE campaigns SET state = :st, state_reason = '', completed_at = now(), updated_at = now(),
               version = version + 1
        WHERE id = :cid
        RETURNING sent_count, failed_count, skipped_count, total_contacts"""),
        {"st": COMPLETED, "cid": campaign_id}).one()
    extra = {"sent_count": counts.sent_count, "failed_count": counts.failed_count,
             "skipped_count": counts.skipped_count}
    audit.record(session, user_id=row.user_id, action="campaign.complete", entity_type="campaign",
                 entity_id=str(campaign_id), description="every message reached a final state",
                 extra_data=extra)
    log.info("campaign=%s completed sent=%d failed=%d skipped=%d", campaign_id, counts.sent_count,
             counts.failed_count, counts.skipped_count)
    return StatusEvent(row.user_id, str(campaign_id), COMPLETED, "", row.webhook_url, dict(extra))


def auto_pause(session: Session, campaign_id: uuid.UUID, reason: str, action: str) -> StatusEvent | None:
    """RUNNING -> PAUSED with a reason, bumping dispatch_epoch so lanes lease nothing more."""
    row = session.execute(_LOCK, {"cid": campaign_id}).one_or_none()
    if row is None or row.state != RUNNING:
        return None
    epoch = session.execute(text("""
        UPDATE campaigns SET state = :st, state_reason = :reason, dispatch_epoch = dispatch_epoch + 1,
               updated_at = now(), version = version + 1
        WHERE id = :cid RETURNING dispatch_epoch"""),
        {"st": PAUSED, "reason": reason, "cid": campaign_id}).scalar_one()
    audit.record(session, user_id=row.user_id, action=action, entity_type="campaign",
                 entity_id=str(campaign_id), description=reason, extra_data={"epoch": epoch})
    log.warning("campaign=%s auto-paused: %s (epoch %d)", campaign_id, reason, epoch)
    return StatusEvent(row.user_id, str(campaign_id), PAUSED, reason, row.webhook_url, {"epoch": epoch})


def publish(events: Events | None, status_events: Iterable[StatusEvent]) -> None:
    """Publish committed status changes (best effort: events never fail the caller)."""
    if events is None:
        return
    for ev in status_events:
        try:
            events.campaign_status(user_id=ev.user_id, campaign_id=ev.campaign_id,
                                   state=CAMPAIGN_STATE_NAMES.get(ev.state, str(ev.state)), reason=ev.reason,
                                   webhook_url=ev.webhook_url, extra=ev.extra)
        except Exception:  # events are best effort; the database is the truth
            log.exception("campaign=%s status event failed", ev.campaign_id)
