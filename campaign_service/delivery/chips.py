"""ReportChipState: a chip's health as seen by the dispatcher, and what follows from it.

A chip leaving rotation (UNAVAILABLE or RESTRICTED) has the PENDING messages it holds in RUNNING
and PAUSED campaigns moved round-robin (in seq order) to the campaign's other ACTIVE chips, in one
set-based UPDATE per campaign. With no ACTIVE chip left, an UNAVAILABLE chip keeps its messages (its
lane backs off and re-checks the session); a RESTRICTED chip's go to UNAVAILABLE chips, and with none
of those either a RUNNING campaign is auto-paused with the reason "no usable chip left".
SENDING messages stay with their lane: it reports their outcome, or releases them, and the
scheduler's sweep moves released ones later (`sweep_unusable_chips`).

Redistribution takes no campaign lock (a Pause/Cancel in progress may hold it while it waits
for the very lane that reports the chip); it only locks the moved message rows."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service import audit, errors, outbox
from campaign_service.db.engine import Database
from campaign_service.delivery import transitions
from campaign_service.delivery.common import (
    CHIP_ACTIVE,
    CHIP_RESTRICTED,
    CHIP_UNAVAILABLE,
    PAUSED,
    PENDING,
    RUNNING,
    bounded_lock_wait,
    parse_uuid,
    set_lock_timeout,
)
from campaign_service.states import ChipState

log = logging.getLogger("campaign_service.delivery")

NO_CHIP_LEFT = "auto-paused: no usable chip left"


@dataclass(frozen=True)
class ChipRow:
    id: uuid.UUID
    display_name: str
    phone: str
    waha_base_url: str
    waha_session: str
    proxy_label: str
    state: int
    state_reason: str
    pacing: dict[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass
class ChipStateResult:
    chip: ChipRow
    redistributed_campaign_ids: list[str] = field(default_factory=list)
    paused_campaign_ids: list[str] = field(default_factory=list)


_UPDATE_CHIP = text("""
UPDATE chips c SET state = :st, state_reason = :reason, updated_at = now()
FROM (SELECT id, state AS old_state FROM chips WHERE id = :chip FOR UPDATE) o
WHERE c.id = o.id
RETURNING c.id, c.user_id, c.display_name, c.phone, c.waha_base_url, c.waha_session, c.proxy_label, c.state,
          c.state_reason, c.pacing, c.created_at, c.updated_at, o.old_state""")

_CANDIDATES = text(f"""
SELECT c.id, c.state FROM campaigns c
WHERE c.user_id = :uid AND c.state IN ({RUNNING:d}, {PAUSED:d})
  AND EXISTS (SELECT 1 FROM campaign_messages m WHERE m.campaign_id = c.id AND m.chip_id = :chip
              AND m.state = {PENDING:d})
ORDER BY c.id""")

_TARGETS = text("""
SELECT count(*) FROM chips ch JOIN campaigns c ON c.id = :cid
WHERE ch.user_id = c.user_id AND ch.state = ANY(CAST(:states AS smallint[])) AND ch.id <> :chip
  AND (cardinality(c.chip_ids) = 0 OR ch.id = ANY(c.chip_ids))""")

# Targets: the campaign's chips (or every chip of the owner when the campaign names none), ACTIVE,
# other than the one leaving. Message i (in seq order) goes to target i mod n.
_REDISTRIBUTE = text(f"""
WITH camp AS (SELECT user_id, chip_ids FROM campaigns WHERE id = :cid),
targets AS (
    SELECT ch.id, row_number() OVER (ORDER BY ch.id) - 1 AS k, count(*) OVER () AS n
    FROM chips ch, camp
    WHERE ch.user_id = camp.user_id AND ch.state = ANY(CAST(:states AS smallint[])) AND ch.id <> :chip
      AND (cardinality(camp.chip_ids) = 0 OR ch.id = ANY(camp.chip_ids))
), moving AS (
    SELECT id, seq FROM campaign_messages
    WHERE campaign_id = :cid AND chip_id = :chip AND state = {PENDING:d}
    ORDER BY seq FOR UPDATE
), numbered AS (
    SELECT id, row_number() OVER (ORDER BY seq) - 1 AS i FROM moving
)
UPDATE campaign_messages m SET chip_id = t.id, updated_at = now()
FROM numbered nb JOIN targets t ON t.k = nb.i % t.n
WHERE m.id = nb.id AND m.state = {PENDING:d}
RETURNING m.id""")


def redistribute(s: Session, campaign_id: uuid.UUID, chip_id: uuid.UUID, campaign_state: int, why: str) -> str:
    """Move the campaign's PENDING messages off chip_id. Returns "moved", "paused" or "".

    Targets are the campaign's ACTIVE chips. With none, an UNAVAILABLE chip (session not WORKING,
    usually transient) keeps its messages: its lane backs off and re-checks the session. A RESTRICTED
    chip hands them to UNAVAILABLE chips that may come back; with no such chip either, a RUNNING
    campaign is auto-paused, since nothing could ever send them."""
    chip_state = s.execute(text("SELECT state FROM chips WHERE id = :chip"), {"chip": str(chip_id)}).scalar()
    params: dict[str, Any] = {"cid": str(campaign_id), "chip": str(chip_id), "states": [CHIP_ACTIVE]}
    if s.execute(_TARGETS, params).scalar_one() == 0:
        if chip_state != CHIP_RESTRICTED:
            return ""
        params["states"] = [CHIP_ACTIVE, CHIP_UNAVAILABLE]
    if s.execute(_TARGETS, params).scalar_one() == 0:
        if campaign_state == RUNNING and transitions.auto_pause(
                s, campaign_id, NO_CHIP_LEFT, "campaign.auto_pause") is not None:
            return "paused"
        return ""
    moved = len(s.execute(_REDISTRIBUTE, params).all())
    if moved:
        audit.record(s, user_id=_owner(s, campaign_id), action="campaign.redistribute", entity_type="campaign",
                     entity_id=str(campaign_id), description=f"{moved} pending messages moved off chip {chip_id}",
                     extra_data={"chip_id": str(chip_id), "moved": moved, "why": why})
        log.info("campaign=%s moved %d pending messages off chip %s (%s)", campaign_id, moved, chip_id, why)
        return "moved"
    return ""


def _owner(s: Session, campaign_id: uuid.UUID) -> uuid.UUID | None:
    return s.execute(text("SELECT user_id FROM campaigns WHERE id = :cid"), {"cid": str(campaign_id)}).scalar()


def validate(chip_id: str, state: int) -> uuid.UUID:
    violations: list[tuple[str, str]] = []
    chip: uuid.UUID | None = None
    try:
        chip = parse_uuid(chip_id, "chip_id")
    except errors.InvalidArgument as e:
        violations += e.violations
    if state not in (CHIP_ACTIVE, CHIP_UNAVAILABLE, CHIP_RESTRICTED):
        violations.append(("state", "must be ACTIVE, UNAVAILABLE or RESTRICTED"))
    if violations or chip is None:
        raise errors.InvalidArgument(violations)
    return chip


def report_chip_state(db: Database, chip_id: str, state: int, reason: str) -> ChipStateResult:
    """Record the chip's state; redistribute or auto-pause when it leaves rotation."""
    chip = validate(chip_id, state)
    with bounded_lock_wait("ReportChipState"), db.transaction() as s:
        set_lock_timeout(s)
        row = s.execute(_UPDATE_CHIP, {"st": state, "reason": reason, "chip": str(chip)}).one_or_none()
        if row is None:
            raise errors.NotFound("chip", chip_id)
        result = ChipStateResult(ChipRow(
            id=row.id, display_name=row.display_name, phone=row.phone, waha_base_url=row.waha_base_url,
            waha_session=row.waha_session, proxy_label=row.proxy_label, state=row.state,
            state_reason=row.state_reason, pacing=row.pacing or {}, created_at=row.created_at,
            updated_at=row.updated_at))
        log.info("chip=%s state=%d reason=%s", chip, state, reason)
        if row.old_state != state:
            extra = {"chip_id": str(chip), "phone": row.phone, "previous_state": ChipState(row.old_state).name,
                     "state": ChipState(state).name, "reason": reason}
            audit.record(s, user_id=row.user_id, action="chip.state_change", entity_type="chip",
                         entity_id=str(chip), description=f"Chip {row.phone} is {ChipState(state).name}: {reason}",
                         extra_data=extra)
            outbox.emit(s, user_id=row.user_id, stream=outbox.chip_stream(chip), type=outbox.CHIP_STATE_CHANGED,
                        data={**extra, "user_id": str(row.user_id)})
        if state != CHIP_ACTIVE:
            why = f"chip {'restricted' if state == CHIP_RESTRICTED else 'unavailable'}: {reason}"
            for c in s.execute(_CANDIDATES, {"uid": row.user_id, "chip": str(chip)}).all():
                if c.state not in (RUNNING, PAUSED):
                    continue
                done = redistribute(s, c.id, chip, c.state, why)
                if done == "moved":
                    result.redistributed_campaign_ids.append(str(c.id))
                elif done == "paused":
                    result.paused_campaign_ids.append(str(c.id))
    return result
