"""PENDING messages of big cancelled campaigns, failed after their Cancel (migration 0016).

CancelCampaign of more than WHAGO_CANCEL_INLINE_ROWS open and failed messages fails the SENDING and
FAILED ones in its transaction and queues the PENDING ones here (1M rows in one UPDATE were ~7 s of
the RPC). Nothing else touches those rows meanwhile: the campaign is CANCELLED, so no lane leases
them and no report names them (reports name leased messages, failed by the Cancel itself).
`sweep_batch` fails a bounded batch per transaction, walking the campaign's PENDING ids upwards
(an index range from `after_id`, so no batch revisits the dead index entries of the ones before)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service.states import MessageState as M

_NEXT = text("SELECT campaign_id, reason, after_id FROM campaign_cancel_sweeps ORDER BY queued_at, campaign_id"
             " LIMIT 1 FOR UPDATE SKIP LOCKED")
# After the queue row, before its messages: a Delete (campaign row FOR UPDATE, then its messages)
# waits for the batch or the batch for it, never both ways.
_CAMPAIGN = text("SELECT 1 FROM campaigns WHERE id = :c FOR KEY SHARE")
_FAIL = text(f"""
WITH picked AS (
    SELECT id FROM campaign_messages WHERE campaign_id = :c AND state = {M.PENDING:d} AND id > :after
    ORDER BY id LIMIT :n
), failed AS (
    UPDATE campaign_messages m SET state = {M.FAILED:d}, failure_reason = :r, lease_owner = NULL,
        lease_expires_at = NULL, updated_at = now()
    WHERE m.id = ANY(ARRAY(SELECT id FROM picked)) AND m.state = {M.PENDING:d}
    RETURNING 1
)
SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM failed), (SELECT max(id) FROM picked)""")


@dataclass(frozen=True)
class SweepStep:
    campaign_id: uuid.UUID
    rows: int  # messages failed by this batch
    done: bool  # none of the campaign's messages is PENDING any more; its queue entry is gone

    def changes(self) -> dict[str, int]:
        return {"campaign_messages": self.rows}


def queue(s: Session, campaign_id: uuid.UUID, reason: str) -> None:
    """In the Cancel's transaction, with the campaign row locked."""
    s.execute(text("INSERT INTO campaign_cancel_sweeps (campaign_id, reason) VALUES (:c, :r)"
                   " ON CONFLICT (campaign_id) DO NOTHING"), {"c": campaign_id, "r": reason})


def sweep_batch(s: Session, limit: int) -> SweepStep | None:
    """Fail up to `limit` PENDING messages of the oldest queued campaign nobody else is sweeping
    (its queue row stays locked until commit); None when there is none."""
    row = s.execute(_NEXT).one_or_none()
    if row is None:
        return None
    cid, reason, after = row
    if s.execute(_CAMPAIGN, {"c": cid}).one_or_none() is None:  # deleted meanwhile: the purge has its rows
        _drop(s, cid)
        return SweepStep(cid, 0, True)
    picked, failed, last = s.execute(_FAIL, {"c": cid, "after": after, "n": limit, "r": reason}).one()
    done = picked < limit
    if done:
        _drop(s, cid)
    else:
        s.execute(text("UPDATE campaign_cancel_sweeps SET after_id = :a WHERE campaign_id = :c"), {"a": last, "c": cid})
    return SweepStep(cid, int(failed), done)


def _drop(s: Session, cid: uuid.UUID) -> None:
    s.execute(text("DELETE FROM campaign_cancel_sweeps WHERE campaign_id = :c"), {"c": cid})


def pending(s: Session) -> int:
    """Campaigns still queued (tests, bench)."""
    return int(s.execute(text("SELECT count(*) FROM campaign_cancel_sweeps")).scalar_one())
