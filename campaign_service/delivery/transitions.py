"""Automatic campaign transitions: COMPLETED when every message is final, PAUSED when a threshold
is crossed or no chip is left. Shared by reports, chip state changes and the scheduler.

Each runs inside the caller's transaction, locks the campaign row FOR UPDATE (so it serializes
with leases, which hold it FOR KEY SHARE, and with Pause/Cancel), and writes an audit row and an
outbox event; it returns a StatusEvent describing the move (None when there was none)."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service import audit, outbox
from campaign_service.delivery.common import (
    COMPLETED,
    PAUSED,
    PENDING,
    RUNNING,
    SENDING,
    StatusEvent,
)
from campaign_service.repository import credits as credits_repo

log = logging.getLogger("campaign_service.delivery")

_LOCK = text("""
    SELECT c.state, c.user_id FROM campaigns c WHERE c.id = :cid FOR UPDATE""")

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
    credits_repo.fold(session, row.user_id, campaign_id)
    extra = {"sent_count": counts.sent_count, "failed_count": counts.failed_count,
             "skipped_count": counts.skipped_count, "total_contacts": counts.total_contacts}
    audit.record(session, user_id=row.user_id, action="campaign.complete", entity_type="campaign",
                 entity_id=str(campaign_id), description="every message reached a final state",
                 extra_data=extra, actor=audit.DELIVERY)
    outbox.campaign_event(session, user_id=row.user_id, campaign_id=campaign_id, type=outbox.CAMPAIGN_COMPLETED,
                          state=COMPLETED.name, extra=extra)
    log.info("campaign=%s completed sent=%d failed=%d skipped=%d", campaign_id, counts.sent_count,
             counts.failed_count, counts.skipped_count)
    return StatusEvent(row.user_id, str(campaign_id), COMPLETED, "", dict(extra))


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
                 entity_id=str(campaign_id), description=reason, extra_data={"epoch": epoch}, actor=audit.DELIVERY)
    outbox.campaign_event(session, user_id=row.user_id, campaign_id=campaign_id, type=outbox.CAMPAIGN_AUTO_PAUSED,
                          state=PAUSED.name, reason=reason, extra={"epoch": epoch})
    log.warning("campaign=%s auto-paused: %s (epoch %d)", campaign_id, reason, epoch)
    return StatusEvent(row.user_id, str(campaign_id), PAUSED, reason, {"epoch": epoch})
