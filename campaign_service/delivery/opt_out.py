"""Suppression in the delivery path: right before a send, a leased message whose number the
campaign's owner suppressed (an opt-out mid-campaign, an AddSuppression) is moved to SKIPPED with
reason OPTED_OUT instead of being handed to the lane, through `reports.apply_in_transaction` (same
transitions, counters, credit release and completion as a lane's SKIPPED report), in the lease's
transaction.

Only messages without an earlier attempt are skipped: one re-leased after an expired lease may
have reached WAHA, and its lane must resolve that first (guarantee 2)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service.db import arrays
from campaign_service.delivery import reports
from campaign_service.repository import suppressions as suppressions_repo

R = TypeVar("R", bound=Any)
#: Leases re-run when every message of a batch was skipped (so a lane is not told "nothing now").
MAX_ROUNDS = 4

_CLEAR_ATTEMPT = text("UPDATE campaign_messages SET waha_message_id = NULL WHERE id = ANY(CAST(:ids AS bigint[]))")


def skip_suppressed(s: Session, cid: uuid.UUID, rows: Sequence[R], lease_again: Callable[[], list[R]]) -> list[R]:
    """The leased rows (with .id, .waha_message_id = earlier attempt, .suppressed = the owner
    suppressed its number, read by the lease statement itself: a query of its own per lease was a
    tenth of campaign_service's time in a start of 5,000 lanes) minus those SKIPPED."""
    out = list(rows)
    for _ in range(MAX_ROUNDS):
        skip = [r for r in out if r.suppressed and r.waha_message_id is None]
        if not skip:
            return out
        ids = [r.id for r in skip]
        reports.apply_in_transaction(s, cid, [
            reports.Report(message_id=i, outcome=reports.SKIPPED, failure_reason=suppressions_repo.OPTED_OUT)
            for i in ids])
        # The id picked for the attempt that will not happen: reusable, and no receipt may match it.
        s.execute(_CLEAR_ATTEMPT, {"ids": arrays.int_literal(ids)})
        dropped = set(ids)
        out = [r for r in out if r.id not in dropped]
        if out:
            return out
        out = lease_again()
        if not out:
            return out
    return out
