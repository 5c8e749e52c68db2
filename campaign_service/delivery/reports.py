"""ReportDeliveries: apply a lane's outcomes set-based, keep counters in step, complete or
auto-pause the campaign when due.

Transitions (anything else is ignored, so late or duplicate reports are harmless):

| outcome     | from                              | to        | also                                      |
|-------------|-----------------------------------|-----------|-------------------------------------------|
| ATTEMPTING  | SENDING                           | SENDING   | waha_message_id stored before the send    |
| SENT        | PENDING, SENDING, FAILED, SKIPPED | SENT      | sent_at, waha id; the truth wins (a send  |
|             |                                   |           | that reached WAHA after a Cancel is SENT) |
| FAILED      | PENDING, SENDING                  | FAILED    | failure_reason                            |
| RELEASED    | SENDING with an unexpired lease   | PENDING   | lease and waha id cleared (never sent)    |
| UNKNOWN     | PENDING, SENDING                  | FAILED    | failure_reason "OUTCOME_UNKNOWN[: detail]"|
| SKIPPED     | PENDING, SENDING                  | SKIPPED   | failure_reason                            |
| DELIVERED   | not DELIVERED/READ                | DELIVERED | sent_at if missing                        |
| READ        | not READ                          | READ      | sent_at if missing                        |

RELEASED after the lease expired is ignored: the message may already be re-leased by another lane
(reports carry no lease owner), and an expired lease is re-leased anyway.

Credits (repository/credits.py), in the same transaction, from each message's first and last state
in the call: not final -> SENT/DELIVERED/READ consumes its reservation, not final -> FAILED/SKIPPED
releases it (one CONSUME and one RELEASE ledger row per call at most); FAILED/SKIPPED -> sent
(a late truth) is charged again, as far as the available credits go."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service import errors, outbox
from campaign_service.db import arrays
from campaign_service.db.engine import Database, PreparedText, execute_prepared
from campaign_service.delivery import transitions
from campaign_service.delivery.common import (
    COMPLETED,
    COUNTERS,
    RUNNING,
    SET_LOCK_TIMEOUT,
    bounded_lock_wait,
    counter_deltas,
    lock_timeout_param,
    parse_uuid,
)
from campaign_service.repository import credits as credits_repo
from campaign_service.states import MessageState as M
from campaign_service.states import Outcome as O

# DeliveryOutcome (delivery_service.proto).
ATTEMPTING, SENT, FAILED, RELEASED, UNKNOWN, SKIPPED, DELIVERED, READ = 1, 2, 3, 4, 5, 6, 7, 8
OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
MAX_REPORTS = 5000


class Report(NamedTuple):
    """One outcome (a NamedTuple: a report of hundreds is built per call, see leases.LeasedMessage)."""

    message_id: int
    outcome: int
    waha_message_id: str = ""
    failure_reason: str = ""
    time: datetime | None = None
    checked: tuple[bool, str] | None = None  # WAHA's check-exists answer: (on WhatsApp, chat id)


@dataclass(frozen=True)
class ReportResult:
    campaign_state: int
    epoch: int
    applied: int


# The report's hot statements are prepared once per connection (db/engine.py PreparedText).
_LOCK_CAMPAIGN = PreparedText.of("whago_report_campaign", text(
    f"SELECT {SET_LOCK_TIMEOUT}, state, dispatch_epoch, user_id FROM campaigns WHERE id = :cid FOR NO KEY UPDATE"))
_READ_CAMPAIGN = text("SELECT state, dispatch_epoch, user_id FROM campaigns WHERE id = :cid")

_APPLY = PreparedText.of("whago_report_apply", text(f"""
WITH r AS (
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:outcomes AS int[]), CAST(:wahas AS text[]),
                         CAST(:reasons AS text[]), CAST(:times AS timestamptz[]))
           AS r(id, outcome, waha, reason, ts)
), old AS (
    SELECT m.id, m.state, m.lease_expires_at FROM campaign_messages m
    WHERE m.campaign_id = :cid AND m.id = ANY(CAST(:ids AS bigint[]))
    ORDER BY m.id FOR UPDATE
), t AS (
    SELECT r.id, r.outcome, r.waha, r.reason, r.ts, old.state AS old_state,
        CASE
            WHEN r.outcome = {O.ATTEMPTING:d} AND old.state = {M.SENDING:d} THEN {M.SENDING:d}
            WHEN r.outcome = {O.SENT:d} AND old.state IN ({M.PENDING:d}, {M.SENDING:d}, {M.FAILED:d}, {M.SKIPPED:d})
                THEN {M.SENT:d}
            WHEN r.outcome = {O.FAILED:d} AND old.state IN ({M.PENDING:d}, {M.SENDING:d}) THEN {M.FAILED:d}
            WHEN r.outcome = {O.RELEASED:d} AND old.state = {M.SENDING:d} AND old.lease_expires_at >= now()
                THEN {M.PENDING:d}
            WHEN r.outcome = {O.UNKNOWN:d} AND old.state IN ({M.PENDING:d}, {M.SENDING:d}) THEN {M.FAILED:d}
            WHEN r.outcome = {O.SKIPPED:d} AND old.state IN ({M.PENDING:d}, {M.SENDING:d}) THEN {M.SKIPPED:d}
            WHEN r.outcome = {O.DELIVERED:d}
                AND old.state IN ({M.PENDING:d}, {M.SENDING:d}, {M.SENT:d}, {M.FAILED:d}, {M.SKIPPED:d})
                THEN {M.DELIVERED:d}
            WHEN r.outcome = {O.READ:d}
                AND old.state IN ({M.PENDING:d}, {M.SENDING:d}, {M.SENT:d}, {M.DELIVERED:d}, {M.FAILED:d},
                                  {M.SKIPPED:d})
                THEN {M.READ:d}
        END AS new_state
    FROM r JOIN old ON old.id = r.id
)
UPDATE campaign_messages m SET
    state = t.new_state,
    waha_message_id = CASE WHEN t.new_state = {M.PENDING:d} THEN NULL
                           ELSE COALESCE(NULLIF(t.waha, ''), m.waha_message_id) END,
    failure_reason = CASE
        WHEN t.outcome = {O.UNKNOWN:d} AND starts_with(t.reason, 'OUTCOME_UNKNOWN') THEN t.reason
        WHEN t.outcome = {O.UNKNOWN:d}
            THEN 'OUTCOME_UNKNOWN' || CASE WHEN t.reason <> '' THEN ': ' || t.reason ELSE '' END
        WHEN t.new_state = {M.FAILED:d} THEN COALESCE(NULLIF(t.reason, ''), 'failed')
        WHEN t.new_state = {M.SKIPPED:d} THEN COALESCE(NULLIF(t.reason, ''), 'skipped')
        WHEN t.new_state IN ({M.PENDING:d}, {M.SENT:d}, {M.DELIVERED:d}, {M.READ:d}) THEN NULL
        ELSE m.failure_reason END,
    sent_at = CASE WHEN t.new_state IN ({M.SENT:d}, {M.DELIVERED:d}, {M.READ:d}) THEN COALESCE(m.sent_at, t.ts, now())
                   ELSE m.sent_at END,
    lease_owner = CASE WHEN t.new_state = {M.SENDING:d} THEN m.lease_owner END,
    lease_expires_at = CASE WHEN t.new_state = {M.SENDING:d} THEN m.lease_expires_at END,
    updated_at = now()
FROM t
WHERE m.id = ANY(CAST(:ids AS bigint[])) AND m.id = t.id AND t.new_state IS NOT NULL
RETURNING m.id, t.old_state, m.state AS new_state
"""))


_COUNTERS = PreparedText.of("whago_report_counters", text(
    f"UPDATE campaigns SET {', '.join(f'{k} = {k} + :{k}' for k in COUNTERS)} WHERE id = :cid "
    "RETURNING state, dispatch_epoch, pending_count, failed_count, settings"))


def validate(campaign_id: str, reports: list[Report]) -> uuid.UUID:
    cid = parse_uuid(campaign_id, "campaign_id")
    violations: list[tuple[str, str]] = []
    if len(reports) > MAX_REPORTS:
        violations.append(("reports", f"at most {MAX_REPORTS} reports per call"))
    for i, r in enumerate(reports):
        if not 1 <= r.outcome <= READ:
            violations.append((f"reports[{i}].outcome", "must be set"))
        if r.outcome == ATTEMPTING and not r.waha_message_id:
            violations.append((f"reports[{i}].waha_message_id", "required for ATTEMPTING"))
    if violations:
        raise errors.InvalidArgument(violations)
    return cid


def parse_message_id(value: str, index: int) -> int:
    """Message ids are decimal bigints on the wire (strings in the proto)."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n <= 0 or n >= 2**63:
        raise errors.InvalidArgument([(f"reports[{index}].message_id", "not a valid message id")])
    return n


def _rounds(reports: list[Report]) -> list[list[Report]]:
    """Split into consecutive segments in which each message appears at most once, so one
    set-based statement per segment applies a message's reports in order (ATTEMPTING, then SENT)."""
    rounds: list[list[Report]] = [[]]
    seen: set[int] = set()
    for r in reports:
        if r.message_id in seen:
            rounds.append([])
            seen = set()
        rounds[-1].append(r)
        seen.add(r.message_id)
    return [b for b in rounds if b]


def _max_failures(settings: dict[str, Any] | None) -> int:
    v = (settings or {}).get("maxFailures", (settings or {}).get("max_failures", 0))
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


_OPEN = frozenset({M.PENDING, M.SENDING})
_PAID = frozenset({M.SENT, M.DELIVERED, M.READ})


def _settle_credits(s: Session, user_id: uuid.UUID, cid: uuid.UUID, moves: Iterable[tuple[int, int]]) -> None:
    sent = failed = skipped = late = 0
    for old, new in moves:
        if old in _OPEN:
            sent += new in _PAID
            failed += new == M.FAILED
            skipped += new == M.SKIPPED
        elif old in (M.FAILED, M.SKIPPED) and new in _PAID:
            late += 1
    if sent or failed or skipped or late:
        credits_repo.settle(s, user_id, cid, sent=sent, failed=failed, skipped=skipped, late_sent=late)


_REMEMBER_CHECKS = text("""
    INSERT INTO number_checks (user_id, phone, on_whatsapp, chat_id, checked_at)
    SELECT DISTINCT ON (ct.phone) :u, ct.phone, r.found, r.chat, now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:found AS boolean[]), CAST(:chats AS text[])) AS r(id, found, chat)
    JOIN campaign_messages m ON m.id = r.id AND m.campaign_id = :cid
    JOIN campaign_contacts ct ON ct.id = m.contact_id
    ON CONFLICT (user_id, phone) DO UPDATE
    SET on_whatsapp = EXCLUDED.on_whatsapp, chat_id = EXCLUDED.chat_id, checked_at = now()""")


def _remember_checks(s: Session, user_id: uuid.UUID, cid: uuid.UUID, reports: list[Report]) -> None:
    """WAHA's check-exists answers the lane reported, cached per user for the next campaign."""
    checks = [(r.message_id, r.checked) for r in reports if r.checked is not None]
    if checks:
        s.execute(_REMEMBER_CHECKS, {"u": user_id, "cid": cid, "ids": [i for i, _ in checks],
                                     "found": [c[0] for _, c in checks], "chats": [c[1] for _, c in checks]})


def report_deliveries(db: Database, campaign_id: str, reports: list[Report]) -> ReportResult:
    """Apply the reports in one transaction (with their events: progress, completion, auto-pause)."""
    cid = validate(campaign_id, reports)
    with bounded_lock_wait("ReportDeliveries"), db.transaction() as s:
        return _apply(s, cid, campaign_id, reports)


def apply_in_transaction(s: Session, cid: uuid.UUID, reports: list[Report]) -> ReportResult:
    """Apply reports inside the caller's transaction (the lease's opt-out skips, delivery/opt_out.py)."""
    return _apply(s, cid, str(cid), reports)


def _apply(s: Session, cid: uuid.UUID, campaign_id: str, reports: list[Report]) -> ReportResult:
    params = {"cid": str(cid)}
    counting = any(r.outcome != ATTEMPTING for r in reports)
    if counting:
        # Campaign row first (lock order), bounded: a Pause/Cancel may hold it FOR UPDATE.
        camp = execute_prepared(s, _LOCK_CAMPAIGN, {**params, **lock_timeout_param()}).one_or_none()
    else:
        # ATTEMPTING only: no campaign lock, so an attempt can always be recorded.
        camp = s.execute(_READ_CAMPAIGN, params).one_or_none()
    if camp is None:
        raise errors.NotFound("campaign", campaign_id)
    state, epoch = camp.state, camp.dispatch_epoch
    changed: list[tuple[int, int]] = []
    first_last: dict[int, tuple[int, int]] = {}  # message id -> (state before the call, state after)
    for batch in _rounds(reports):
        rows = execute_prepared(s, _APPLY, {
            **params,
            "ids": arrays.int_literal([r.message_id for r in batch]),
            "outcomes": arrays.int_literal([r.outcome for r in batch]),
            "wahas": arrays.literal([r.waha_message_id for r in batch]),
            "reasons": arrays.literal([r.failure_reason for r in batch]),
            "times": arrays.timestamp_literal([r.time for r in batch]),
        }).all()
        for mid, old, new in rows:  # unpacked: a Row's attribute access costs ~0.4 us, per row and column
            changed.append((old, new))
            first = first_last.get(mid)
            first_last[mid] = (old if first is None else first[0], new)
    _remember_checks(s, camp.user_id, cid, reports)
    deltas = counter_deltas(changed)
    if any(deltas.values()):
        row = execute_prepared(s, _COUNTERS, {**params, **deltas}).one()
        state, epoch = row.state, row.dispatch_epoch
        # The counter decides whether to look (a drifted counter is caught by the scheduler's
        # completion sweep); the check itself recounts under the row lock.
        if state == RUNNING and deltas["pending_count"] < 0 and row.pending_count <= 0:
            ev = transitions.complete_if_done(s, cid)
            if ev is not None:
                state = ev.state
        threshold = _max_failures(row.settings)
        if state == RUNNING and threshold > 0 and deltas["failed_count"] > 0 and row.failed_count >= threshold:
            ev = transitions.auto_pause(
                s, cid, f"auto-paused: {row.failed_count} failures (threshold {threshold})", "campaign.auto_pause")
            if ev is not None:
                state, epoch = ev.state, int(ev.extra["epoch"])  # type: ignore[call-overload]
        if state != COMPLETED:
            outbox.campaign_progress(s, cid)
    # Last: a running campaign's credits settle on its own row (repository/credits.py); a late send,
    # or the report that completed the campaign, takes the user's row, the one lock all of a
    # tenant's lanes share, so it is held for the commit only (completion and auto-pause move no credits).
    _settle_credits(s, camp.user_id, cid, first_last.values())
    return ReportResult(state, epoch, len(changed))
