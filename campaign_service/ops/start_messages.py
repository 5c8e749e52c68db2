"""StartCampaign's messages of a big campaign, written by several PostgreSQL backends at once.

One INSERT ... SELECT runs on one backend: a 1M-contact Start spent nearly all of its time in that
one statement (16.6 of 17 s in `make bench`) while the second core stayed idle. A campaign of at
least `start_parallel_min` contacts gets its messages in `parts` slices of the send order, each written on
its own connection in its own transaction, committed before Start's transaction (which holds the
campaign row FOR UPDATE, still DRAFT or SCHEDULED) reserves the credits and commits RUNNING.

Until that commit the campaign is not RUNNING, so no lane leases the slices' messages. If Start
fails after slices committed, `discard` removes them once Start's transaction is over; if the
process dies in between, they stay behind a campaign that is not RUNNING until its next Start
(which clears leftovers first) or its Delete (which counts and removes them)."""

from __future__ import annotations

import itertools
import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service.db.engine import Database
from campaign_service.repository import messages as messages_repo
from campaign_service.repository.messages import StartPlan
from campaign_service.states import CampaignState


def is_parallel(total_contacts: int, parts: int, minimum: int) -> bool:
    """Below `minimum` contacts (Settings.start_parallel_min, 200k) one statement is fast (100k:
    ~1 s) and leaves nothing behind."""
    return parts >= 2 and total_contacts >= minimum


def write(db: Database, s: Session, plan: StartPlan, total_contacts: int, parts: int, minimum: int) -> int:
    """Create the campaign's messages (the caller's transaction `s` holds the campaign row locked);
    returns how many. Leftovers of an interrupted earlier Start go first. In parallel (see
    `is_parallel`) the messages are committed apart from `s`: on any error the caller must call
    `discard` after `s` is rolled back."""
    messages_repo.delete_all(s, plan.campaign_id)
    if not is_parallel(total_contacts, parts, minimum):
        return messages_repo.create_for_start(s, plan)
    bounds = [total_contacts * k // parts for k in range(parts)] + [2**62]  # the last takes any rest
    with ThreadPoolExecutor(parts, thread_name_prefix="start-insert") as pool:
        futures = [pool.submit(_write_slice, db, plan, lo, hi) for lo, hi in itertools.pairwise(bounds)]
    return sum(f.result() for f in futures)


def _write_slice(db: Database, plan: StartPlan, lo: int, hi: int) -> int:
    with db.transaction() as s:
        return messages_repo.create_for_start(s, plan, lo, hi)


def discard(db: Database, campaign_id: uuid.UUID) -> None:
    """Remove the messages of a failed parallel Start, unless the campaign did start after all."""
    with db.transaction() as s:
        state = s.execute(text("SELECT state FROM campaigns WHERE id = :c FOR UPDATE"),
                          {"c": campaign_id}).scalar_one_or_none()
        if state in (CampaignState.DRAFT, CampaignState.SCHEDULED):
            messages_repo.delete_all(s, campaign_id)
