"""The outbox itself, against the session's PostgreSQL: sequence numbers per stream under
concurrent writers, the rate bound of progress events, and the retention sweep."""

from __future__ import annotations

import threading
import uuid

from sqlalchemy import text

from campaign_service import outbox
from campaign_service.db.engine import Database
from campaign_service.relay import store
from tests.helpers import wait_for
from tests.test_delivery_fixtures import delivery_db, make_user

__all__ = ["delivery_db"]


def test_sequences_have_no_gaps_under_concurrent_writers(delivery_db: Database) -> None:
    user = make_user(delivery_db)
    stream = f"campaign:{uuid.uuid4()}"

    def write(n: int) -> None:
        for _ in range(n):
            with delivery_db.transaction() as s:
                outbox.emit(s, user_id=user, stream=stream, type=outbox.CAMPAIGN_UPDATED, data={"x": 1})

    threads = [threading.Thread(target=write, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with delivery_db.session() as s:
        rows = s.execute(text("SELECT seq, (data->>'seq')::int AS body_seq FROM events WHERE stream = :s ORDER BY id"),
                         {"s": stream}).all()
    assert [r.seq for r in rows] == list(range(1, 101))  # in commit (id) order, no gap, no repeat
    assert all(r.seq == r.body_seq for r in rows)


def test_progress_is_rate_bounded(delivery_db: Database) -> None:
    user = make_user(delivery_db)
    with delivery_db.transaction() as s:
        cid = s.execute(text("INSERT INTO campaigns (id, user_id, name, state) VALUES (gen_random_uuid(), :u, 'p', 3) "
                             "RETURNING id"), {"u": user}).scalar_one()
    made = []
    for _ in range(5):
        with delivery_db.transaction() as s:
            made.append(outbox.campaign_progress(s, cid))
    assert made[0] is not None and made[1:] == [None] * 4  # one per PROGRESS_INTERVAL_SECONDS


def test_retention_keeps_events_still_owed(delivery_db: Database) -> None:
    user = make_user(delivery_db)
    stream = f"campaign:{uuid.uuid4()}"
    with delivery_db.transaction() as s:
        ids = [outbox.emit(s, user_id=user, stream=stream, type=outbox.CAMPAIGN_UPDATED, data={}) for _ in range(3)]
        # Disabled: the session's live relay (same database) must not queue deliveries of its own here.
        ep = s.execute(text("INSERT INTO webhook_endpoints (id, user_id, url, secret, enabled) VALUES "
                            "(gen_random_uuid(), :u, 'http://127.0.0.1:9/', 'whsec_x', false) RETURNING id"),
                       {"u": user}).scalar_one()
        s.execute(text("INSERT INTO webhook_deliveries (endpoint_id, event_id, stream, state) VALUES "
                       "(:e, :a, :s, 2), (:e, :b, :s, 1)"), {"e": ep, "a": ids[0], "b": ids[1], "s": stream})
        s.execute(text("UPDATE events SET relayed_at = now(), created_at = now() - interval '40 days' "
                       "WHERE id = ANY(:ids)"), {"ids": ids[:2]})
    store.prune(delivery_db, 30 * 86400)
    with delivery_db.session() as s:
        left = s.execute(text("SELECT id FROM events WHERE stream = :s ORDER BY id"), {"s": stream}).scalars().all()
        deliveries = s.execute(text("SELECT event_id FROM webhook_deliveries WHERE endpoint_id = :e"),
                               {"e": ep}).scalars().all()
    # the delivered one went (with its delivery); the one still owed and the recent one stay
    assert left == ids[1:] and deliveries == [ids[1]]


def test_recording_attempts_takes_the_endpoint_before_its_deliveries(delivery_db: Database) -> None:
    """DeleteWebhookEndpoint locks the endpoint row, then (its cascade) the deliveries. The relay's
    record() must take them in that order too: it updated the deliveries first and then waited for
    the endpoint, which deadlocked against a Delete (seen as UNAVAILABLE by DeleteWebhookEndpoint)."""
    user = make_user(delivery_db)
    stream = f"campaign:{uuid.uuid4()}"
    with delivery_db.transaction() as s:
        ev = outbox.emit(s, user_id=user, stream=stream, type=outbox.CAMPAIGN_UPDATED, data={})
        # Disabled: the session's live relay (same database) leaves it alone.
        ep = s.execute(text("INSERT INTO webhook_endpoints (id, user_id, url, secret, enabled) VALUES "
                            "(gen_random_uuid(), :u, 'http://127.0.0.1:9/', 'whsec_x', false) RETURNING id"),
                       {"u": user}).scalar_one()
        did = s.execute(text("INSERT INTO webhook_deliveries (endpoint_id, event_id, stream, state) VALUES "
                             "(:e, :ev, :s, 1) RETURNING id"), {"e": ep, "ev": ev, "s": stream}).scalar_one()
    due = store.Due(did, ep, "http://127.0.0.1:9/", ("whsec_x",), 0, None)  # type: ignore[arg-type]
    with delivery_db.engine.connect() as delete:  # what DeleteWebhookEndpoint holds before its cascade
        delete.execute(text("SELECT id FROM webhook_endpoints WHERE id = :e FOR UPDATE"), {"e": ep})
        relay = threading.Thread(target=store.record, args=(
            delivery_db, [(due, store.Outcome(500, 3, "HTTP 500", False, 5.0))], 600.0))
        relay.start()
        holder = delete.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with delivery_db.engine.connect() as watch:
            blocked = text("SELECT count(*) FROM pg_stat_activity WHERE :p = ANY(pg_blocking_pids(pid))")
            wait_for(lambda: watch.execute(blocked, {"p": holder}).scalar_one() >= 1, 10,
                     "the relay waiting for the endpoint")
        # The relay waits without holding the delivery: the Delete's cascade goes through.
        delete.execute(text("SELECT id FROM webhook_deliveries WHERE id = :d FOR UPDATE NOWAIT"), {"d": did})
        delete.rollback()
    relay.join(10)
    assert not relay.is_alive()
    with delivery_db.session() as s:
        assert s.execute(text("SELECT attempts FROM webhook_deliveries WHERE id = :d"), {"d": did}).scalar_one() == 1
