"""Campaign messages: created set-based at Start, failed set-based at Cancel (a big campaign's
PENDING ones in batches after it, repository/cancel_sweeps.py), deleted in one statement at Delete
(a big campaign's in batches after it, repository/purges.py)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

from campaign_service.repository import cancel_sweeps
from campaign_service.states import MessageState as M


def _start_insert(shuffle: bool) -> TextClause:
    """One PENDING message per contact numbered rn in (lo, hi]: send order seq = rn over row_no (or a
    seeded hash of the contact id: every part of a parallel Start must see the same order), chip =
    chip_ids[(rn-1) % n], template by weight: template_pattern[contact_hash(contact id) % len]
    (templates.pick_template, the same in SQL)."""
    order = "hashint8extended(id, :seed), id" if shuffle else "row_no, id"
    return text(
        "INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, state, seq, template_index)"
        f" SELECT :c, t.id, (CAST(:chips AS uuid[]))[((t.rn - 1) % :n) + 1], {M.PENDING:d}, t.rn,"
        "        (CAST(:pattern AS int[]))[((t.id % 2147483647) * 48271 % 2147483647) % :plen + 1]"
        f" FROM (SELECT id, row_number() OVER (ORDER BY {order}) AS rn"
        "       FROM campaign_contacts WHERE campaign_id = :c) t"
        " WHERE t.rn > :lo AND t.rn <= :hi")


_START_INSERT = {shuffle: _start_insert(shuffle) for shuffle in (False, True)}


@dataclass(frozen=True)
class StartPlan:
    """What Start creates: its messages' chips, template pattern and order."""

    campaign_id: uuid.UUID
    chip_ids: Sequence[uuid.UUID]
    template_pattern: Sequence[int]
    shuffle: bool
    seed: int = field(default_factory=lambda: secrets.randbits(62))

    def params(self, lo: int, hi: int) -> dict[str, object]:
        pattern = list(self.template_pattern) or [0]
        return {"c": self.campaign_id, "chips": [str(c) for c in self.chip_ids], "n": len(self.chip_ids),
                "pattern": pattern, "plen": len(pattern), "seed": self.seed, "lo": lo, "hi": hi}


def create_for_start(session: Session, plan: StartPlan, lo: int = 0, hi: int = 2**62) -> int:
    """The messages numbered (lo, hi] (all by default) in ONE statement; returns how many."""
    result = session.execute(_START_INSERT[plan.shuffle], plan.params(lo, hi))
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class CancelResult:
    failed: int  # rows FAILED by the cancel (incl. those already FAILED), now or by its sweep
    were_open: int  # of which PENDING or SENDING before (never sent: their credits are released)
    deferred: int = 0  # of which PENDING, left to the background sweep (repository/cancel_sweeps.py)


_CANCEL_COUNTS = text(
    f"SELECT count(*) FILTER (WHERE state <> {M.FAILED:d}), count(*) FILTER (WHERE state = {M.PENDING:d}), count(*)"
    f" FROM campaign_messages WHERE campaign_id = :c AND state IN ({M.PENDING:d}, {M.SENDING:d}, {M.FAILED:d})")


def _fail(states: Sequence[M]) -> TextClause:
    return text(
        f"UPDATE campaign_messages SET state = {M.FAILED:d}, failure_reason = :r, lease_owner = NULL,"
        " lease_expires_at = NULL, updated_at = now() WHERE campaign_id = :c"
        f" AND state IN ({', '.join(f'{s:d}' for s in states)})")


_FAIL_ALL = _fail((M.PENDING, M.SENDING, M.FAILED))
_FAIL_LEASED_AND_FAILED = _fail((M.SENDING, M.FAILED))


def fail_open(session: Session, campaign_id: uuid.UUID, reason: str, inline_limit: int) -> CancelResult:
    """PENDING, SENDING and FAILED -> FAILED with `reason`, leases dropped.

    The caller holds the campaign row FOR UPDATE, so leases and outcome reports (all but ATTEMPTING,
    which moves no state) wait: the counts and the update see the same rows. Single-table
    statements rather than an UPDATE joined to a locking subquery of the same table, which the
    planner turned into a rescan per row (minutes) when the table's statistics were stale.
    Above `inline_limit` rows the PENDING ones are queued for the sweep instead (1M rows in one
    UPDATE were ~7 s of the Cancel): they are inert once the campaign is CANCELLED, while SENDING
    and FAILED ones may still get a late report, so those are failed here."""
    were_open, pending, total = session.execute(_CANCEL_COUNTS, {"c": campaign_id}).one()
    if total <= inline_limit:
        session.execute(_FAIL_ALL, {"c": campaign_id, "r": reason})
        return CancelResult(int(total), int(were_open))
    session.execute(_FAIL_LEASED_AND_FAILED, {"c": campaign_id, "r": reason})
    cancel_sweeps.queue(session, campaign_id, reason)
    return CancelResult(int(total), int(were_open), int(pending))


def count_open(session: Session, campaign_id: uuid.UUID) -> int:
    """PENDING and SENDING messages of the campaign (those holding a credit reservation)."""
    return int(session.execute(text(
        f"SELECT count(*) FROM campaign_messages WHERE campaign_id = :c AND state IN ({M.PENDING:d}, {M.SENDING:d})"),
        {"c": campaign_id}).scalar_one())


def count(session: Session, campaign_id: uuid.UUID) -> int:
    return int(session.execute(text("SELECT count(*) FROM campaign_messages WHERE campaign_id = :c"),
                               {"c": campaign_id}).scalar_one())


def delete_all(session: Session, campaign_id: uuid.UUID) -> int:
    return int(session.execute(text("DELETE FROM campaign_messages WHERE campaign_id = :c"),
                               {"c": campaign_id}).rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class MessageRow:
    id: int
    campaign_id: uuid.UUID
    contact_id: int
    phone: str
    chat_id: str
    chip_id: uuid.UUID
    state: int
    waha_message_id: str | None
    failure_reason: str | None
    attempts: int
    sent_at: datetime | None
    updated_at: datetime
    template_index: int = 0
    name: str = ""
    variables: dict[str, str] | None = None
    variant: str = ""  # filled by the caller from the campaign's templates


def page(session: Session, campaign_id: uuid.UUID, state: int, limit: int, after_id: int) -> list[MessageRow]:
    cond = "AND m.state = :s" if state else ""
    rows = session.execute(text(
        "SELECT m.id, m.campaign_id, m.contact_id, c.phone, c.chat_id, m.chip_id, m.state, m.waha_message_id,"
        " m.failure_reason, m.attempts, m.sent_at, m.updated_at, m.template_index, c.name, c.variables"
        " FROM campaign_messages m JOIN campaign_contacts c ON c.id = m.contact_id"
        f" WHERE m.campaign_id = :c {cond} AND m.id > :after ORDER BY m.id LIMIT :lim"),
        {"c": campaign_id, "s": state, "after": after_id, "lim": limit}).all()
    return [MessageRow(*r) for r in rows]


def open_chip_ids(session: Session, campaign_id: uuid.UUID) -> list[uuid.UUID]:
    """Chips that still have PENDING or SENDING messages of the campaign (the lanes to resume)."""
    return list(session.execute(text(
        f"SELECT DISTINCT chip_id FROM campaign_messages WHERE campaign_id = :c"
        f" AND state IN ({M.PENDING:d}, {M.SENDING:d})"),
        {"c": campaign_id}).scalars())
