"""DeliveryService domain functions against the real PostgreSQL: leases, reports, chip state, media."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from campaign_service import errors
from campaign_service.db.engine import Database
from campaign_service.db.models import AuditEvent, Media
from campaign_service.delivery import chips, leases, media, reports
from campaign_service.delivery.reports import (
    ATTEMPTING,
    DELIVERED,
    FAILED,
    READ,
    RELEASED,
    SENT,
    SKIPPED,
    UNKNOWN,
    Report,
)
from tests.test_delivery_fixtures import (
    PAUSED,
    RUNNING,
    RecordingEvents,
    campaign_row,
    check_counters,
    delivery_db,
    events,
    make_world,
    message_rows,
    set_messages,
)

__all__ = ["delivery_db", "events"]  # fixtures used by the tests below

M_PENDING, M_SENDING, M_SENT, M_DELIVERED, M_READ, M_FAILED, M_SKIPPED = 1, 2, 3, 4, 5, 6, 7


def lease(db: Database, w: object, chip: str, n: int = 10, epoch: int = 1, secs: int = 60,
          owner: str = "t") -> leases.LeaseResult:
    return leases.lease_messages(db, w.cid, chip, epoch, n, secs, owner)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- LeaseMessages


def test_lease_marks_sending_renders_and_orders(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=9, chips=3)
    r = lease(delivery_db, w, w.chip(0), n=2)
    assert r.campaign_state == RUNNING and r.epoch == 1
    # chip 0 holds seq 0, 3, 6: the first two in seq order, one left.
    assert [m.message_id for m in r.messages] == [w.message_ids[0], w.message_ids[3]]
    assert r.remaining == 1
    m0 = r.messages[0]
    assert m0.text == f"Hi Contact 0 ({w.contact_phones[0]}) City0"
    assert m0.chat_id == f"{w.contact_phones[0]}@c.us" and m0.phone == w.contact_phones[0]
    assert m0.attempts == 1 and m0.waha_message_id is None and m0.media is None
    rows = {m.id: m for m in message_rows(delivery_db, w.campaign_id)}
    assert rows[m0.message_id].state == M_SENDING and rows[m0.message_id].lease_owner == "t"
    assert rows[w.message_ids[1]].state == M_PENDING
    # Leasing changes no counter: pending_count counts PENDING + SENDING.
    assert campaign_row(delivery_db, w.campaign_id).pending_count == 9
    check_counters(delivery_db, w.campaign_id)
    # The lane's heartbeat is recorded for the watchdog.
    with delivery_db.session() as s:
        hb = s.execute(text("SELECT lease_seconds, lease_owner FROM delivery_lanes WHERE campaign_id = :c"),
                       {"c": w.cid}).one()
    assert tuple(hb) == (60, "t")


def test_lease_missing_placeholders_render_empty(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=1, chips=1, variables={},
                   templates=[{"text": "A{{name}}B{{ nope }}C{{phone}}"}])
    r = lease(delivery_db, w, w.chip(0))
    assert r.messages[0].text == f"AContact 0BC{w.contact_phones[0]}"


def test_lease_rotates_templates(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=4, chips=1, templates=[{"text": "one"}, {"text": "two {{name}}"}])
    r = lease(delivery_db, w, w.chip(0))
    assert [m.text for m in r.messages] == ["one", "two Contact 1", "one", "two Contact 3"]


@pytest.mark.parametrize("state", [PAUSED, 5, 6, 1])
def test_lease_nothing_unless_running(delivery_db: Database, state: int) -> None:
    w = make_world(delivery_db, contacts=3, chips=1, state=state)
    r = lease(delivery_db, w, w.chip(0))
    assert r.messages == [] and r.campaign_state == state and r.remaining == 3
    assert {m.state for m in message_rows(delivery_db, w.campaign_id)} == {M_PENDING}


def test_lease_nothing_on_stale_epoch(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=3, chips=1, epoch=5)
    r = lease(delivery_db, w, w.chip(0), epoch=4)
    assert r.messages == [] and r.epoch == 5 and r.campaign_state == RUNNING
    assert len(lease(delivery_db, w, w.chip(0), epoch=5).messages) == 3


def test_lease_validation_names_fields(delivery_db: Database) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        leases.lease_messages(delivery_db, "nope", "", 1, 0, 3601, "x")
    assert {f for f, _ in e.value.violations} == {"campaign_id", "chip_id", "max_messages", "lease_seconds"}
    with pytest.raises(errors.InvalidArgument) as e:
        leases.lease_messages(delivery_db, str(uuid.uuid4()), str(uuid.uuid4()), 1, 1001, 0, "x")
    assert {f for f, _ in e.value.violations} == {"max_messages", "lease_seconds"}
    with pytest.raises(errors.NotFound):
        leases.lease_messages(delivery_db, str(uuid.uuid4()), str(uuid.uuid4()), 1, 1, 1, "x")


def test_concurrent_leasers_never_share_a_message(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=600, chips=1)
    got: list[list[int]] = [[] for _ in range(8)]
    failures: list[BaseException] = []

    def lane(i: int) -> None:
        try:
            while True:
                r = lease(delivery_db, w, w.chip(0), n=7, owner=f"lane-{i}")
                if not r.messages:
                    return
                got[i] += [m.message_id for m in r.messages]
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    everything = [m for g in got for m in g]
    dupes = [m for m, c in Counter(everything).items() if c > 1]
    assert dupes == []
    assert sorted(everything) == sorted(w.message_ids)
    assert sum(1 for g in got if g) > 1  # really concurrent
    rows = message_rows(delivery_db, w.campaign_id)
    assert {r.attempts for r in rows} == {1} and {r.state for r in rows} == {M_SENDING}


def test_expired_lease_is_re_leased_with_its_waha_id(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=2, chips=1)
    first = lease(delivery_db, w, w.chip(0), n=1)
    mid = first.messages[0].message_id
    reports.report_deliveries(delivery_db, w.cid, [Report(mid, ATTEMPTING, "true_x@c.us_AAA")])
    # A live lease is not re-leased: the next lease gets the other message only.
    second = lease(delivery_db, w, w.chip(0), n=5)
    assert [m.message_id for m in second.messages] == [w.message_ids[1]]
    assert lease(delivery_db, w, w.chip(0), n=5).messages == []
    # The first lane dies: its lease expires, the message comes back, carrying the id to check.
    set_messages(delivery_db, [mid], lease_expires_at=text("now() - interval '1 second'"))
    again = lease(delivery_db, w, w.chip(0), n=5, owner="lane-2")
    assert [m.message_id for m in again.messages] == [mid]
    assert again.messages[0].waha_message_id == "true_x@c.us_AAA" and again.messages[0].attempts == 2
    check_counters(delivery_db, w.campaign_id)


# ---------------------------------------------------------------- ReportDeliveries


def states(db: Database, w: object) -> dict[int, tuple[int, str | None, str | None]]:
    return {m.id: (m.state, m.waha_message_id, m.failure_reason)
            for m in message_rows(db, w.campaign_id)}  # type: ignore[attr-defined]


def test_report_transitions_and_counters(delivery_db: Database, events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=9, chips=1)
    ids = [m.message_id for m in lease(delivery_db, w, w.chip(0), n=8).messages]
    a, b, c, d, e, f, g, h = ids
    out = reports.report_deliveries(delivery_db, w.cid, [
        Report(a, ATTEMPTING, "wa-a"), Report(b, ATTEMPTING, "wa-b"), Report(c, ATTEMPTING, "wa-c"),
        Report(d, ATTEMPTING, "wa-d")])
    assert out.campaign_state == RUNNING and out.epoch == 1 and out.applied == 4
    st = states(delivery_db, w)
    assert st[a] == (M_SENDING, "wa-a", None)
    out = reports.report_deliveries(delivery_db, w.cid, [
        Report(a, SENT, "wa-a"),
        Report(b, FAILED, failure_reason="HTTP 400: bad chat id"),
        Report(c, RELEASED, failure_reason="stop fence"),
        Report(d, UNKNOWN, failure_reason="timeout, WAHA lookup failed"),
        Report(e, SKIPPED, failure_reason="not on WhatsApp"),
        Report(f, SENT, "wa-f"), Report(f, DELIVERED), Report(f, READ),  # in order, same call
        Report(g, SENT, "wa-g"),
        Report(h, UNKNOWN, failure_reason="OUTCOME_UNKNOWN: lookup failed"),
    ])
    st = states(delivery_db, w)
    assert st[a] == (M_SENT, "wa-a", None)
    assert st[b] == (M_FAILED, "wa-b", "HTTP 400: bad chat id")  # the attempted id is kept
    assert st[c] == (M_PENDING, None, None)  # released: never sent, id cleared, leasable again
    assert st[d] == (M_FAILED, "wa-d", "OUTCOME_UNKNOWN: timeout, WAHA lookup failed")
    assert st[e] == (M_SKIPPED, None, "not on WhatsApp")
    assert st[f] == (M_READ, "wa-f", None)
    assert st[g] == (M_SENT, "wa-g", None)
    assert st[h] == (M_FAILED, None, "OUTCOME_UNKNOWN: lookup failed")
    rows = {m.id: m for m in message_rows(delivery_db, w.campaign_id)}
    assert rows[a].sent_at is not None and rows[a].lease_expires_at is None and rows[c].lease_owner is None
    # Never backwards: DELIVERED after READ, SENT after DELIVERED change nothing.
    reports.report_deliveries(delivery_db, w.cid, [Report(f, DELIVERED), Report(g, DELIVERED),
                                                           Report(g, SENT, "other")])
    st = states(delivery_db, w)
    assert st[f][0] == M_READ and st[g] == (M_DELIVERED, "wa-g", None)
    row = campaign_row(delivery_db, w.campaign_id)
    # pending: c (PENDING again) + the one never leased; sent = a, f, g (cumulative).
    assert (row.pending_count, row.sent_count, row.delivered_count, row.read_count, row.failed_count,
            row.skipped_count) == (2, 3, 2, 1, 3, 1)
    check_counters(delivery_db, w.campaign_id)
    assert row.state == RUNNING and events.calls == []


def test_report_ignores_senseless_transitions(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=3, chips=1)
    pending_id = w.message_ids[2]
    a, b = (m.message_id for m in lease(delivery_db, w, w.chip(0), n=2).messages)
    reports.report_deliveries(delivery_db, w.cid, [Report(a, SENT, "wa-a"), Report(b, FAILED, "", "x")])
    out = reports.report_deliveries(delivery_db, w.cid, [
        Report(a, FAILED, failure_reason="late"),   # SENT stays SENT
        Report(a, RELEASED),                        # not SENDING
        Report(b, ATTEMPTING, "wa-b"),              # not SENDING
        Report(pending_id, RELEASED),               # not SENDING
        Report(pending_id, ATTEMPTING, "wa-p"),     # not SENDING: not leased
    ])
    assert out.applied == 0
    st = states(delivery_db, w)
    assert st[a] == (M_SENT, "wa-a", None) and st[b] == (M_FAILED, None, "x")
    assert st[pending_id] == (M_PENDING, None, None)
    # Messages of another campaign are untouched.
    other = make_world(delivery_db, contacts=1, chips=1)
    reports.report_deliveries(delivery_db, w.cid, [Report(other.message_ids[0], SKIPPED)])
    assert message_rows(delivery_db, other.campaign_id)[0].state == M_PENDING
    check_counters(delivery_db, w.campaign_id)
    check_counters(delivery_db, other.campaign_id)


def test_released_after_lease_expiry_is_ignored(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=1, chips=1)
    mid = lease(delivery_db, w, w.chip(0)).messages[0].message_id
    reports.report_deliveries(delivery_db, w.cid, [Report(mid, ATTEMPTING, "wa-1")])
    set_messages(delivery_db, [mid], lease_expires_at=text("now() - interval '1 second'"))
    reports.report_deliveries(delivery_db, w.cid, [Report(mid, RELEASED)])
    assert states(delivery_db, w)[mid] == (M_SENDING, "wa-1", None)


def test_sent_after_cancel_wins(delivery_db: Database) -> None:
    """A send that reached WAHA is SENT even if a Cancel already failed the message."""
    w = make_world(delivery_db, contacts=2, chips=1)
    mid = lease(delivery_db, w, w.chip(0), n=1).messages[0].message_id
    reports.report_deliveries(delivery_db, w.cid, [Report(mid, ATTEMPTING, "wa-late")])
    with delivery_db.transaction() as s:  # what Cancel does
        s.execute(text("""UPDATE campaign_messages SET state = 6, failure_reason = 'cancelled by user'
                          WHERE campaign_id = :c AND state IN (1, 2, 6)"""), {"c": w.cid})
        s.execute(text("""UPDATE campaigns SET state = 5, completed_at = now(), pending_count = 0,
                          failed_count = 2 WHERE id = :c"""), {"c": w.cid})
    out = reports.report_deliveries(delivery_db, w.cid, [Report(mid, SENT, "wa-late")])
    assert out.campaign_state == 5
    assert states(delivery_db, w)[mid] == (M_SENT, "wa-late", None)
    row = campaign_row(delivery_db, w.campaign_id)
    assert (row.sent_count, row.failed_count, row.pending_count) == (1, 1, 0)
    check_counters(delivery_db, w.campaign_id)


def test_report_validation(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=1, chips=1)
    with pytest.raises(errors.InvalidArgument) as e:
        reports.report_deliveries(delivery_db, w.cid, [Report(1, 0), Report(2, ATTEMPTING, "")])
    assert {f for f, _ in e.value.violations} == {"reports[0].outcome", "reports[1].waha_message_id"}
    with pytest.raises(errors.InvalidArgument) as e:
        reports.report_deliveries(delivery_db, "x", [])
    assert e.value.violations[0][0] == "campaign_id"
    with pytest.raises(errors.InvalidArgument) as e:
        reports.parse_message_id("abc", 3)
    assert e.value.violations[0][0] == "reports[3].message_id"
    with pytest.raises(errors.NotFound):
        reports.report_deliveries(delivery_db, str(uuid.uuid4()), [Report(1, SENT, "x")])


def test_completion_when_all_final(delivery_db: Database, events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=3, chips=1)
    ids = [m.message_id for m in lease(delivery_db, w, w.chip(0), n=3).messages]
    out = reports.report_deliveries(delivery_db, w.cid, [Report(ids[0], SENT, "w0"),
                                                                 Report(ids[1], FAILED, failure_reason="x")])
    assert out.campaign_state == RUNNING and events.calls == []
    out = reports.report_deliveries(delivery_db, w.cid, [Report(ids[2], SKIPPED)])
    assert out.campaign_state == 6
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == 6 and row.completed_at is not None
    assert events.states(w.cid) == ["COMPLETED"]
    with delivery_db.session() as s:
        assert s.query(AuditEvent).filter_by(entity_id=w.cid, action="campaign.complete").count() == 1
    # A late receipt after completion is recorded but does not reopen anything.
    out = reports.report_deliveries(delivery_db, w.cid, [Report(ids[0], DELIVERED)])
    assert out.campaign_state == 6 and len(events.calls) == 1
    check_counters(delivery_db, w.campaign_id)


def test_auto_pause_at_failure_threshold(delivery_db: Database, events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=10, chips=1, settings={"maxFailures": 3})
    ids = [m.message_id for m in lease(delivery_db, w, w.chip(0), n=5).messages]
    out = reports.report_deliveries(delivery_db, w.cid, [Report(i, FAILED, failure_reason="boom")
                                                                 for i in ids[:2]])
    assert out.campaign_state == RUNNING and out.epoch == 1
    out = reports.report_deliveries(delivery_db, w.cid, [Report(ids[2], UNKNOWN)])
    assert out.campaign_state == PAUSED and out.epoch == 2
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == PAUSED and row.state_reason == "auto-paused: 3 failures (threshold 3)"
    assert row.dispatch_epoch == 2
    assert events.states(w.cid) == ["PAUSED"]
    assert events.calls[0]["reason"] == "auto-paused: 3 failures (threshold 3)"
    with delivery_db.session() as s:
        assert s.query(AuditEvent).filter_by(entity_id=w.cid, action="campaign.auto_pause").count() == 1
    # The lanes stop: old epoch leases nothing, and so does the new one while PAUSED.
    assert lease(delivery_db, w, w.chip(0), epoch=1).messages == []
    assert lease(delivery_db, w, w.chip(0), epoch=2).messages == []
    # In-flight outcomes are still recorded while paused.
    out = reports.report_deliveries(delivery_db, w.cid, [Report(ids[3], SENT, "w3"),
                                                                 Report(ids[4], RELEASED)])
    assert out.campaign_state == PAUSED
    check_counters(delivery_db, w.campaign_id)


def test_threshold_zero_never_pauses(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=4, chips=1, settings={"maxFailures": 0})
    ids = [m.message_id for m in lease(delivery_db, w, w.chip(0), n=3).messages]
    out = reports.report_deliveries(delivery_db, w.cid, [Report(i, FAILED) for i in ids])
    assert out.campaign_state == RUNNING


# ---------------------------------------------------------------- ReportChipState


def test_restricted_chip_pending_redistributed_round_robin(delivery_db: Database,
                                                           events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=12, chips=3)
    # Chip 0 holds seq 0, 3, 6, 9; one of them is in flight and stays with its lane.
    inflight = lease(delivery_db, w, w.chip(0), n=1).messages[0].message_id
    out = chips.report_chip_state(delivery_db, w.chip(0), 3, "WhatsApp error 463")
    assert out.chip.state == 3 and out.chip.state_reason == "WhatsApp error 463"
    assert out.redistributed_campaign_ids == [w.cid] and out.paused_campaign_ids == []
    rows = message_rows(delivery_db, w.campaign_id)
    by_seq = {r.seq: r for r in rows}
    assert by_seq[0].id == inflight and by_seq[0].chip_id == w.chip_ids[0] and by_seq[0].state == M_SENDING
    # seq 3, 6, 9 alternate over chips 1 and 2.
    assert [by_seq[s].chip_id for s in (3, 6, 9)] == [w.chip_ids[1], w.chip_ids[2], w.chip_ids[1]]
    load = Counter(r.chip_id for r in rows if r.state == M_PENDING)
    assert load == {w.chip_ids[1]: 6, w.chip_ids[2]: 5}
    assert campaign_row(delivery_db, w.campaign_id).state == RUNNING and events.calls == []
    # The other lanes now lease the moved messages.
    assert len(lease(delivery_db, w, w.chip(1), n=100).messages) == 6
    check_counters(delivery_db, w.campaign_id)


def test_unavailable_chip_with_no_active_chip_left_keeps_its_messages_and_the_campaign_running(
        delivery_db: Database, events: RecordingEvents) -> None:
    """A session that is not WORKING is usually transient: its lane backs off and re-checks, so with
    no ACTIVE chip to take over, the messages stay PENDING on it and the campaign keeps RUNNING."""
    w = make_world(delivery_db, contacts=6, chips=2)
    chips.report_chip_state(delivery_db, w.chip(1), 3, "restricted")
    out = chips.report_chip_state(delivery_db, w.chip(0), 2, "session not WORKING")
    assert out.paused_campaign_ids == [] and out.redistributed_campaign_ids == []
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == RUNNING and row.dispatch_epoch == 1
    assert events.states(w.cid) == []
    rows = message_rows(delivery_db, w.campaign_id)
    assert {m.state for m in rows} == {M_PENDING} and {m.chip_id for m in rows} == {w.chip_ids[0]}
    # ACTIVE again: just the state; the same lane sends them.
    out = chips.report_chip_state(delivery_db, w.chip(0), 1, "")
    assert out.chip.state == 1 and out.paused_campaign_ids == [] == out.redistributed_campaign_ids
    assert campaign_row(delivery_db, w.campaign_id).state == RUNNING


def test_restricted_chip_hands_its_messages_to_an_unavailable_chip_and_pauses_only_when_none_is_left(
        delivery_db: Database, events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=6, chips=3)
    chips.report_chip_state(delivery_db, w.chip(1), 2, "session not WORKING")
    out = chips.report_chip_state(delivery_db, w.chip(0), 3, "463")
    assert out.redistributed_campaign_ids == [w.cid] and out.paused_campaign_ids == []
    assert w.chip_ids[0] not in {m.chip_id for m in message_rows(delivery_db, w.campaign_id)}
    chips.report_chip_state(delivery_db, w.chip(1), 3, "463")
    out = chips.report_chip_state(delivery_db, w.chip(2), 3, "463")
    assert out.paused_campaign_ids == [w.cid]
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == PAUSED and row.state_reason == chips.NO_CHIP_LEFT
    assert events.states(w.cid) == ["PAUSED"]
    assert {m.state for m in message_rows(delivery_db, w.campaign_id)} == {M_PENDING}


def test_paused_campaign_messages_move_but_it_is_not_paused_again(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=4, chips=2, state=PAUSED)
    out = chips.report_chip_state(delivery_db, w.chip(0), 3, "463")
    assert out.redistributed_campaign_ids == [w.cid]
    assert {m.chip_id for m in message_rows(delivery_db, w.campaign_id)} == {w.chip_ids[1]}


def test_campaign_without_chip_ids_uses_the_owners_chips(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=4, chips=2, name_chip_ids=False)
    chips.report_chip_state(delivery_db, w.chip(1), 3, "463")
    assert {m.chip_id for m in message_rows(delivery_db, w.campaign_id)} == {w.chip_ids[0]}


def test_chip_state_validation(delivery_db: Database) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        chips.report_chip_state(delivery_db, "bad", 0, "")
    assert {f for f, _ in e.value.violations} == {"chip_id", "state"}
    with pytest.raises(errors.NotFound):
        chips.report_chip_state(delivery_db, str(uuid.uuid4()), 1, "")


# ---------------------------------------------------------------- media


def test_media_in_lease_and_content(delivery_db: Database, tmp_path: Path) -> None:
    mid = uuid.uuid4()
    w = make_world(delivery_db, contacts=2, chips=1,
                   templates=[{"text": "pic for {{name}}", "mediaId": str(mid)}, {"text": "plain"}])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f.jpg").write_bytes(b"\xff\xd8jpeg")
    with delivery_db.transaction() as s:
        s.add(Media(id=mid, campaign_id=w.campaign_id, filename="f.jpg", mime_type="image/jpeg", size_bytes=6,
                    path="c/f.jpg"))
    got = lease(delivery_db, w, w.chip(0)).messages
    assert got[0].media is not None and got[0].media.id == mid and got[0].media.mime_type == "image/jpeg"
    assert got[0].text == "pic for Contact 0" and got[1].media is None
    info, content = media.get_media_content(delivery_db, tmp_path, str(mid))
    assert content == b"\xff\xd8jpeg" and info.filename == "f.jpg"
    with pytest.raises(errors.NotFound):
        media.get_media_content(delivery_db, tmp_path / "elsewhere", str(mid))
    with pytest.raises(errors.NotFound):
        media.get_media_content(delivery_db, tmp_path, str(uuid.uuid4()))
    with pytest.raises(errors.InvalidArgument):
        media.get_media_content(delivery_db, tmp_path, "nope")


# ---------------------------------------------------------------- Pause/Cancel holding the row


def test_lock_waits_are_bounded_and_attempting_never_waits(delivery_db: Database,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """While a Pause holds the campaign row FOR UPDATE (calling the dispatcher, which waits for the
    lanes' sends in flight), a lane can still record ATTEMPTING; leases and counted reports wait at
    most LOCK_TIMEOUT and then get UNAVAILABLE (retried by the dispatcher's client)."""
    from campaign_service.delivery import common

    monkeypatch.setattr(common, "LOCK_TIMEOUT", "300ms")
    w = make_world(delivery_db, contacts=2, chips=1)
    mid = lease(delivery_db, w, w.chip(0), n=1).messages[0].message_id
    held, release = threading.Event(), threading.Event()

    def pause_in_progress() -> None:
        with delivery_db.transaction() as s:
            s.execute(text("SELECT 1 FROM campaigns WHERE id = :c FOR UPDATE"), {"c": w.cid})
            held.set()
            release.wait(20)

    t = threading.Thread(target=pause_in_progress)
    t.start()
    try:
        assert held.wait(10)
        out = reports.report_deliveries(delivery_db, w.cid, [Report(mid, ATTEMPTING, "wa-during-pause")])
        assert out.campaign_state == RUNNING
        with pytest.raises(errors.Unavailable):
            lease(delivery_db, w, w.chip(0))
        with pytest.raises(errors.Unavailable):
            reports.report_deliveries(delivery_db, w.cid, [Report(mid, SENT, "wa-during-pause")])
    finally:
        release.set()
        t.join(10)
    assert states(delivery_db, w)[mid] == (M_SENDING, "wa-during-pause", None)
    reports.report_deliveries(delivery_db, w.cid, [Report(mid, SENT, "wa-during-pause")])
    assert states(delivery_db, w)[mid][0] == M_SENT
