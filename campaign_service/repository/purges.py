"""Contacts and messages of deleted campaigns, removed after their campaign (migration 0014).

DeleteCampaign removes a big campaign's row at once (so it is NOT_FOUND everywhere from its commit
on, and no lane can lease from it) and queues the campaign here instead of deleting its rows in the
request: 2M row deletions took 5.5 s of a 1M-contact DeleteCampaign. `purge_batch` removes them a
bounded batch per transaction (campaign_service/sweeps.py runs it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

# The batch is picked through an index on campaign_id, then deleted by primary key.
_DELETE = {
    table: text(f"DELETE FROM {table} WHERE id = ANY(ARRAY("
                f"SELECT id FROM {table} WHERE campaign_id = :c LIMIT :n))")
    for table in ("campaign_messages", "campaign_contacts")
}
_NEXT = text("SELECT campaign_id FROM campaign_purges ORDER BY queued_at, campaign_id LIMIT 1 FOR UPDATE SKIP LOCKED")


@dataclass(frozen=True)
class PurgeStep:
    campaign_id: uuid.UUID
    messages: int
    contacts: int
    done: bool  # nothing of the campaign is left; its queue entry is gone

    def changes(self) -> dict[str, int]:
        return {"campaign_messages": self.messages, "campaign_contacts": self.contacts}


def queue(s: Session, campaign_id: uuid.UUID) -> None:
    """In the Delete's transaction, with the campaign row."""
    s.execute(text("INSERT INTO campaign_purges (campaign_id) VALUES (:c) ON CONFLICT DO NOTHING"), {"c": campaign_id})


def purge_batch(s: Session, limit: int) -> PurgeStep | None:
    """Delete up to `limit` rows of the oldest queued campaign nobody else is purging (its queue
    row stays locked until commit, so replicas take different campaigns); None when there is none."""
    cid = s.execute(_NEXT).scalar_one_or_none()
    if cid is None:
        return None
    messages = int(s.execute(_DELETE["campaign_messages"], {"c": cid, "n": limit}).rowcount)  # type: ignore[attr-defined]
    contacts = 0
    if messages < limit:
        contacts = int(s.execute(_DELETE["campaign_contacts"],  # type: ignore[attr-defined]
                                 {"c": cid, "n": limit - messages}).rowcount)
    done = messages + contacts < limit
    if done:
        s.execute(text("DELETE FROM campaign_purges WHERE campaign_id = :c"), {"c": cid})
    return PurgeStep(cid, messages, contacts, done)


def pending(s: Session) -> int:
    """Campaigns still queued (tests, bench)."""
    return int(s.execute(text("SELECT count(*) FROM campaign_purges")).scalar_one())
