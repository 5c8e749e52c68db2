"""The relay's SQL: outbox rows to fan out, deliveries that are due, and what an attempt did.

Deliveries of one (endpoint, stream) go out in event order: only the oldest open delivery of each
pair (its "head") is ever due, so a receiver sees a campaign's events in sequence even across
retries; other streams keep flowing meanwhile."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service import audit, outbox
from campaign_service.db.engine import Database
from campaign_service.relay.payloads import EventRow
from campaign_service.states import DeliveryState

PENDING, DELIVERED, FAILED = DeliveryState.PENDING, DeliveryState.DELIVERED, DeliveryState.FAILED

_TAKE = text("""
    SELECT id, user_id, stream, seq, type, data, created_at FROM events
    WHERE relayed_at IS NULL ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED""")
_FAN_OUT = text(f"""
    INSERT INTO webhook_deliveries (endpoint_id, event_id, stream, state)
    SELECT w.id, e.id, e.stream, {PENDING:d}
    FROM events e JOIN webhook_endpoints w ON w.user_id = e.user_id AND w.enabled
      AND (cardinality(w.event_types) = 0 OR e.type = ANY(w.event_types))
    WHERE e.id = ANY(CAST(:ids AS bigint[])) AND e.type <> '{outbox.WEBHOOK_TEST}'
    ORDER BY e.id, w.id""")
_MARK = text("UPDATE events SET relayed_at = now() WHERE id = ANY(CAST(:ids AS bigint[]))")


def relay_batch(db: Database, publish: Callable[[list[EventRow]], None], limit: int = 500) -> int:
    """Fan out up to `limit` outbox rows in one transaction; returns how many."""
    with db.transaction() as s:
        rows = [EventRow.of(r) for r in s.execute(_TAKE, {"n": limit})]
        if not rows:
            return 0
        publish(rows)
        ids = [r.id for r in rows]
        s.execute(_FAN_OUT, {"ids": ids})
        s.execute(_MARK, {"ids": ids})
    return len(rows)


@dataclass(frozen=True)
class Due:
    delivery_id: int
    endpoint_id: uuid.UUID
    url: str
    secrets: tuple[str, ...]
    attempts: int
    event: EventRow


_DUE = text(f"""
    WITH heads AS (
        SELECT DISTINCT ON (endpoint_id, stream) id, endpoint_id, event_id, attempts, next_attempt_at
        FROM webhook_deliveries WHERE state = {PENDING:d}
        ORDER BY endpoint_id, stream, id)
    SELECT h.id, h.endpoint_id, h.attempts, w.url, w.secret, w.previous_secret, w.previous_secret_expires_at,
           e.id AS event_id, e.user_id, e.stream, e.seq, e.type, e.data, e.created_at
    FROM heads h JOIN webhook_endpoints w ON w.id = h.endpoint_id JOIN events e ON e.id = h.event_id
    WHERE h.next_attempt_at <= now() AND w.enabled AND NOT (h.id = ANY(CAST(:busy AS bigint[])))
    ORDER BY h.next_attempt_at, h.id LIMIT :n""")
_SOONEST = text(f"SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = {PENDING:d}")


def due(db: Database, busy: Sequence[int], limit: int) -> tuple[list[Due], datetime | None]:
    """Heads due now (not already in flight), and when the soonest open delivery is due."""
    now = datetime.now(UTC)
    with db.session() as s:
        rows = s.execute(_DUE, {"busy": list(busy), "n": limit}).all()
        soonest = s.execute(_SOONEST).scalar()
    out = []
    for r in rows:
        live = [r.secret]
        if r.previous_secret and r.previous_secret_expires_at and r.previous_secret_expires_at > now:
            live.append(r.previous_secret)
        out.append(Due(r.id, r.endpoint_id, r.url, tuple(live), r.attempts,
                       EventRow(r.event_id, r.user_id, r.stream, r.seq, r.type, r.data, r.created_at)))
    return out, soonest


@dataclass(frozen=True)
class Outcome:
    status_code: int  # 0: no answer
    latency_ms: int
    error: str
    ok: bool
    retry_in: float | None  # seconds until the next try; None: no more tries


_RECORD = text(f"""
    WITH r AS (
        SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:states AS smallint[]), CAST(:codes AS int[]),
                             CAST(:errs AS text[]), CAST(:waits AS float8[]), CAST(:ms AS int[]))
                      AS r(id, st, code, err, wait, ms)),
    a AS (INSERT INTO webhook_attempts (delivery_id, status_code, latency_ms, error)
          SELECT id, code, ms, err FROM r)
    UPDATE webhook_deliveries d SET state = r.st, attempts = d.attempts + 1, last_status_code = r.code,
           last_error = r.err, next_attempt_at = now() + make_interval(secs => r.wait), updated_at = now()
    FROM r WHERE d.id = r.id AND d.state = {PENDING:d}""")
# Endpoints first, deliveries after: the order DeleteWebhookEndpoint takes them in (its row, then the
# cascade to its deliveries). Updating the deliveries first deadlocked against a Delete.
_LOCK_ENDPOINTS = text("SELECT id FROM webhook_endpoints WHERE id = ANY(CAST(:eps AS uuid[])) ORDER BY id "
                       "FOR NO KEY UPDATE")
_HEALTHY = text("UPDATE webhook_endpoints SET failing_since = NULL WHERE id = :e AND failing_since IS NOT NULL")
_FAILING = text("""
    UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()) WHERE id = :e
    RETURNING user_id, url, failing_since, enabled""")


def record(db: Database, done: Sequence[tuple[Due, Outcome]], disable_after: float) -> list[uuid.UUID]:
    """Store a batch of attempts and their consequences in one transaction (one commit for many
    deliveries: the commit is most of the cost of one). Returns the endpoints it disabled."""
    disabled: list[uuid.UUID] = []
    states, waits = [], []
    for _, o in done:
        if o.ok:
            state, wait = DELIVERED, 0.0
        elif o.retry_in is None:
            state, wait = FAILED, 0.0
        else:
            state, wait = PENDING, o.retry_in
        states.append(int(state))
        waits.append(wait)
    with db.transaction() as s:
        s.execute(_LOCK_ENDPOINTS, {"eps": sorted({str(d.endpoint_id) for d, _ in done})})
        s.execute(_RECORD, {"ids": [d.delivery_id for d, _ in done], "states": states,
                            "codes": [o.status_code for _, o in done], "errs": [o.error[:1000] for _, o in done],
                            "waits": waits, "ms": [o.latency_ms for _, o in done]})
        healthy = {d.endpoint_id for d, o in done if o.ok}
        failing = {d.endpoint_id for d, o in done if not o.ok} - healthy
        for e in sorted(healthy):
            s.execute(_HEALTHY, {"e": e})
        for e in sorted(failing):
            ep = s.execute(_FAILING, {"e": e}).one_or_none()
            if ep is None or not ep.enabled:
                continue
            if datetime.now(UTC) - ep.failing_since >= timedelta(seconds=disable_after):
                disable(s, e, ep.user_id, f"every delivery failed since {ep.failing_since.isoformat()}")
                disabled.append(e)
    return disabled


_DISABLE = text("""
    UPDATE webhook_endpoints SET enabled = false, disabled_reason = :why, updated_at = now(), version = version + 1
    WHERE id = :e""")
_DROP_OPEN = text(f"""
    UPDATE webhook_deliveries SET state = {FAILED:d}, last_error = 'endpoint disabled', updated_at = now()
    WHERE endpoint_id = :e AND state = {PENDING:d}""")


def disable(s: Session, endpoint_id: uuid.UUID, user_id: uuid.UUID, why: str) -> None:
    """Disable a failing endpoint: its open deliveries are dead-lettered, and a webhook.disabled
    event tells the user's other endpoints (the audit log names the webhook sender)."""
    s.execute(_DISABLE, {"why": why, "e": endpoint_id})
    s.execute(_DROP_OPEN, {"e": endpoint_id})
    audit.record(s, user_id=user_id, action="webhook.disable", entity_type="webhook", entity_id=str(endpoint_id),
                 description=f"Endpoint disabled: {why}", extra_data={"why": why}, actor=audit.WEBHOOKS)
    outbox.emit(s, user_id=user_id, stream=outbox.webhook_stream(endpoint_id), type=outbox.WEBHOOK_DISABLED,
                data={"endpoint_id": str(endpoint_id), "user_id": str(user_id), "reason": why})


_PRUNE = text(f"""
    WITH gone AS (DELETE FROM events WHERE id IN (
        SELECT e.id FROM events e
        WHERE e.relayed_at IS NOT NULL AND e.created_at < now() - make_interval(secs => :age)
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id AND d.state = {PENDING:d})
        ORDER BY e.id LIMIT :n) RETURNING 1)
    SELECT count(*) FROM gone""")


def prune(db: Database, older_than_seconds: float, limit: int = 10_000) -> int:
    """Drop relayed events older than the retention (with their finished deliveries and attempts);
    an event still owed to an endpoint stays. Stream sequence numbers live on in event_streams."""
    with db.transaction() as s:
        return int(s.execute(_PRUNE, {"age": older_than_seconds, "n": limit}).scalar_one())
