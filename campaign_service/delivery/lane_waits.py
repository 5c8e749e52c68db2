"""ReportLaneWait: a lane that holds off on purpose says until when, so the watchdog waits too.

A lane held back by an hourly or daily cap, or a closed sending window, defers its next slice and
leases nothing meanwhile. Without this the watchdog (scheduler.py) took that silence for a stall
once `stall_seconds` passed, and restarted the dispatch with a new epoch and an audit event, again
and again until the cap freed a slot. The wait is recorded on the lane's delivery_lanes row for
the campaign's current epoch only (a restart or a resume makes it moot), and the lane's next lease
clears it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from campaign_service import errors
from campaign_service.db.engine import Database
from campaign_service.delivery.common import RUNNING, parse_uuid

log = logging.getLogger("campaign_service.delivery")

# Outer bound of a reported wait (the dispatcher reports at most this much of a longer one: the
# watchdog then restarts the lane after a week of silence, which is harmless).
MAX_AHEAD = timedelta(days=7)
MAX_REASON = 500

_WAIT = text(f"""
WITH c AS (
    SELECT state, dispatch_epoch FROM campaigns WHERE id = :cid
), lane AS (
    SELECT EXISTS (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid AND chip_id = :chip) AS known
), up AS (
    INSERT INTO delivery_lanes (campaign_id, chip_id, last_seen_at, lease_seconds, lease_owner, resume_at,
                                resume_epoch)
    SELECT :cid, :chip, now(), 0, '', :resume, :epoch FROM c, lane
    WHERE c.state = {RUNNING:d} AND c.dispatch_epoch = :epoch AND lane.known
    ON CONFLICT (campaign_id, chip_id) DO UPDATE
    SET last_seen_at = now(), resume_at = EXCLUDED.resume_at, resume_epoch = EXCLUDED.resume_epoch
    RETURNING 1
)
SELECT c.state, c.dispatch_epoch, lane.known, EXISTS (SELECT 1 FROM up) AS recorded FROM c, lane
""")


@dataclass(frozen=True)
class LaneWaitResult:
    campaign_state: int
    epoch: int
    recorded: bool


def report_lane_wait(db: Database, campaign_id: str, chip_id: str, epoch: int, resume_at: datetime | None,
                     reason: str) -> LaneWaitResult:
    """Record that the lane (campaign, chip) sends again at `resume_at`, if the campaign is RUNNING
    under `epoch`; otherwise nothing is written and `recorded` is False."""
    violations: list[tuple[str, str]] = []
    ids = []
    for name, value in (("campaign_id", campaign_id), ("chip_id", chip_id)):
        try:
            ids.append(parse_uuid(value, name))
        except errors.InvalidArgument as e:
            violations += e.violations
    if resume_at is None:
        violations.append(("resume_time", "required"))
    elif resume_at > datetime.now(UTC) + MAX_AHEAD:
        violations.append(("resume_time", f"at most {MAX_AHEAD.days} days ahead"))
    if len(reason) > MAX_REASON:
        violations.append(("reason", f"at most {MAX_REASON} characters"))
    if violations:
        raise errors.InvalidArgument(violations)
    cid, chip = ids
    with db.transaction() as s:
        row = s.execute(_WAIT, {"cid": str(cid), "chip": str(chip), "epoch": epoch, "resume": resume_at}).one_or_none()
    if row is None:
        raise errors.NotFound("campaign", str(cid))
    if not row.known:
        raise errors.NotFound("lane", f"campaigns/{cid}/chips/{chip}")
    if row.recorded:
        log.info("campaign=%s chip=%s lane waits until %s (epoch %d): %s", cid, chip,
                 resume_at.isoformat() if resume_at else "-", epoch, reason or "-")
    return LaneWaitResult(row.state, row.dispatch_epoch, bool(row.recorded))
