"""The background jobs: scheduled starts, chip sweep, completion sweep, stalled-dispatch watchdog.

Most tests drive `Scheduler.run_once()`'s jobs directly against the real PostgreSQL with a
recording dispatcher; the last one runs the whole stack (the scheduler inside campaign_service,
the real dispatcher, worker and WAHA sandbox)."""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import event, text

from campaign_service import errors
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.db.models import AuditEvent
from campaign_service.delivery import lane_waits, leases, watchdog
from campaign_service.delivery import scheduler as scheduler_mod
from campaign_service.delivery.scheduler import _HAS_OPEN, Scheduler, SchedulerConfig
from devstack.procs import ServiceProcess
from devstack.servers import Postgres, free_port
from tests.conftest import SANDBOX_API_KEY, SECRETS_ENV, SERVICE_TOKEN, auth
from tests.helpers import Api, phones
from tests.test_delivery_fixtures import (
    PAUSED,
    RUNNING,
    RecordingEvents,
    campaign_row,
    check_counters,
    events,
    make_world,
    message_rows,
    migrated_database,
    set_messages,
)
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res
from whago.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb2
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc

__all__ = ["delivery_db", "events"]


@pytest.fixture(scope="module")
def delivery_db(postgres: Postgres) -> Iterator[Database]:
    """A database of this module's own: the session's live campaign services (and the isolated
    stacks') share `whago`, and their watchdogs kicked these tests' aged campaigns first under load."""
    yield from migrated_database(postgres, "whago_scheduler")


@pytest.fixture(scope="module")
def live_db(database_url: str) -> Iterator[Database]:
    """The session's database, the live stack's (the whole-stack tests read its rows)."""
    db = Database(database_url, pool_size=4)
    yield db
    db.dispose()


class RecordingDispatcher:
    """Stands in for campaign_service.dispatch.DispatcherClient."""

    def __init__(self, fail: bool = False) -> None:
        self.starts: list[tuple[str, int, list[Any]]] = []
        self.fail = fail

    def start(self, campaign_id: str, epoch: int, lanes: list[Any], camouflage: Any) -> None:
        if self.fail:
            raise errors.Unavailable("dispatcher down")
        self.starts.append((campaign_id, epoch, lanes))

    def close(self) -> None:
        pass


class RecordingOps:
    """Stands in for CampaignLifecycle: records start_scheduled calls, optionally refusing."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[uuid.UUID] = []
        self.refuse = refuse

    def start_scheduled(self, campaign_id: uuid.UUID) -> object | None:
        self.calls.append(campaign_id)
        if self.refuse:
            raise errors.FailedPrecondition("NO_CONTACTS", "the campaign has no contacts: import some first")
        return object()


def scheduler(db: Database, events: Any = None, dispatcher: Any = None, ops: Any = None,
              stall: float = 1.0) -> Scheduler:
    return Scheduler(db, Settings(secret_keys=SECRETS_ENV["WHAGO_SECRET_KEYS"]),
                     SchedulerConfig(tick_seconds=0.1, stall_seconds=stall, batch=500),
                     ops=ops, dispatcher=dispatcher or RecordingDispatcher())


def age(db: Database, campaign_id: uuid.UUID, seconds: int = 3600) -> None:
    """Pretend the campaign was started long ago."""
    with db.transaction() as s:
        s.execute(text("UPDATE campaigns SET updated_at = now() - make_interval(secs => :s) WHERE id = :c"),
                  {"s": seconds, "c": str(campaign_id)})


def epoch_of(db: Database, campaign_id: uuid.UUID) -> int:
    return int(campaign_row(db, campaign_id).dispatch_epoch)


def restarted(db: Database, w: Any, kicked: list[str], epoch: int = 1) -> bool:
    """Whether the watchdog restarted w (dispatch epoch was `epoch`): this scheduler, or the one of
    a campaign server of the test session (same database), which may have come first."""
    return w.cid in kicked or epoch_of(db, w.campaign_id) > epoch


def within_a_rotation(sweep: Callable[[], list[str]], cid: str, candidates: int) -> bool:
    """Whether `sweep`, probing 2 candidates a tick (the tests patch the page to 2), reports `cid`
    within one rotation through `candidates`."""
    found: list[str] = []
    for _ in range(candidates // 2 + 2):
        found += sweep()
        if cid in found:
            return True
    return False


# ---------------------------------------------------------------- completion sweep


def test_completion_sweep_completes_a_finished_running_campaign(delivery_db: Database,
                                                                 events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=3, chips=1)
    busy = make_world(delivery_db, contacts=2, chips=1)
    # The last report was lost: every message is final but the campaign is still RUNNING.
    set_messages(delivery_db, w.message_ids, state=3, waha_message_id="x")
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE campaigns SET pending_count = 0, sent_count = 3 WHERE id = :c"), {"c": w.cid})
    done = scheduler(delivery_db, events).complete_finished()
    assert w.cid in done and busy.cid not in done
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == 6 and row.completed_at is not None
    assert events.states(w.cid) == ["COMPLETED"]
    assert campaign_row(delivery_db, busy.campaign_id).state == RUNNING


def test_completion_sweep_probes_each_running_campaign_by_its_literal_id(
        delivery_db: Database, events: RecordingEvents, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep runs every tick over every RUNNING campaign: one probe per campaign, planned with
    that campaign's id as a literal (as one statement with the id a parameter, statistics taken
    while one campaign ran with every message PENDING made it seq-scan campaign_messages per
    running campaign: 0.6-9.9 s a tick in `make bench` cancel). The probe reaches the messages
    through the campaign's index; the running campaigns are probed a page per tick, so a finished
    one is found within a rotation however many run."""
    w = make_world(delivery_db, contacts=3, chips=1)
    with delivery_db.transaction() as s:
        s.execute(text("SET LOCAL enable_seqscan = off"))  # the table is tiny here: a seq scan would win it
        plan = "\n".join(s.execute(text("EXPLAIN " + _HAS_OPEN.text.replace(":cid", f"'{w.cid}'"))).scalars())
    assert "ix_messages_campaign_state" in plan or "ix_messages_lane" in plan, plan
    set_messages(delivery_db, w.message_ids, state=3, waha_message_id="x")
    monkeypatch.setattr(scheduler_mod, "FINISHED_PROBES_PER_TICK", 2)
    sch = scheduler(delivery_db, events)
    with delivery_db.session() as s:
        running = s.execute(text("SELECT count(*) FROM campaigns WHERE state = 3")).scalar_one()
    assert within_a_rotation(sch.complete_finished, w.cid, running), f"not found among {running} running"
    assert campaign_row(delivery_db, w.campaign_id).state == 6


def _message_scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plan nodes (EXPLAIN FORMAT JSON) that read campaign_messages."""
    if node.get("Relation Name") == "campaign_messages":
        yield node
    for child in node.get("Plans", []):
        yield from _message_scans(child)


def test_the_sweeps_read_messages_only_by_literal_campaign_ids_through_an_index(delivery_db: Database) -> None:
    """The chip sweep, the completion sweep and the watchdog run every tick. Each of their reads of
    campaign_messages names its campaign as a literal, so the planner prices it from that campaign's
    own statistics, and reaches it through an index: written as one statement over the running
    campaigns (correlated EXISTS), statistics taken while one big campaign ran with every message
    PENDING planned the watchdog's check as a hash over a seq scan of the whole table every tick
    (335 ms a tick at 2.25M rows, measured; 14 ms as now), as they had the completion sweep's."""
    w = make_world(delivery_db, contacts=4, chips=2)
    age(delivery_db, w.campaign_id)
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE chips SET state = 3 WHERE id = :c"), {"c": w.chip(1)})
    reads: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sql = cursor.mogrify(statement, parameters).decode()
        if "campaign_messages" in sql and sql.lstrip().upper().startswith("SELECT"):
            reads.append(sql)

    engines = (delivery_db.engine, delivery_db.read_engine)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", capture)
    try:
        sch = scheduler(delivery_db)
        sch.sweep_unusable_chips()
        sch.complete_finished()
        kicked = sch.kick_stalled()
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", capture)
    assert w.cid in kicked  # every kind of read ran: pairs probed, moved, completion probed, kicked
    assert len(reads) >= 4, reads
    for sql in reads:
        with delivery_db.transaction() as s:
            s.execute(text("SET LOCAL enable_seqscan = off"))  # the tables are tiny here
            plan = s.execute(text("EXPLAIN (FORMAT JSON) " + sql.replace(":", r"\:"))).scalar_one()[0]["Plan"]
        scans = list(_message_scans(plan))
        assert scans, sql
        for node in scans:
            cond = node.get("Index Cond") or node.get("Recheck Cond", "")  # a bitmap scan: its index's
            assert node["Node Type"] != "Seq Scan" and "campaign_id = '" in cond, (sql, node["Node Type"], cond)


def test_the_watchdog_and_the_chip_sweep_reach_every_campaign_a_page_at_a_time(
        delivery_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both probe a bounded page of candidates per tick (quiet campaigns; campaign and restricted
    chip pairs), going on from where the last tick stopped: a stalled campaign or a lane to move is
    reached within a rotation, however many candidates come before it."""
    monkeypatch.setattr(scheduler_mod, "STALL_PROBES_PER_TICK", 2)
    monkeypatch.setattr(scheduler_mod, "UNUSABLE_PROBES_PER_TICK", 2)
    for _ in range(4):  # quiet campaigns with nothing to send, and restricted chips with nothing on them
        q = make_world(delivery_db, contacts=1, chips=2)
        age(delivery_db, q.campaign_id)
        set_messages(delivery_db, q.message_ids, state=3, waha_message_id="x")
        with delivery_db.transaction() as s:
            s.execute(text("UPDATE chips SET state = 3 WHERE id = :c"), {"c": q.chip(1)})
    w = make_world(delivery_db, contacts=4, chips=2)
    age(delivery_db, w.campaign_id)
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE chips SET state = 3 WHERE id = :c"), {"c": w.chip(1)})
    sch = scheduler(delivery_db)
    with delivery_db.session() as s:
        quiet = s.execute(text(f"SELECT count(*) FROM campaigns c WHERE {watchdog._QUIET}"),
                          {"stall": 1.0}).scalar_one()
        pairs = s.execute(text(scheduler_mod._UNUSABLE_PAGE.text),
                          {"after_cid": uuid.UUID(int=0), "after_chip": uuid.UUID(int=0), "n": 10**6}).all()
    assert quiet >= 5 and len(pairs) >= 5
    assert within_a_rotation(sch.sweep_unusable_chips, w.cid, len(pairs)), f"not swept among {len(pairs)} pairs"
    assert all(m.chip_id == w.chip_ids[0] for m in message_rows(delivery_db, w.campaign_id))
    assert within_a_rotation(sch.kick_stalled, w.cid, quiet), f"not kicked among {quiet} quiet campaigns"


# ---------------------------------------------------------------- watchdog


def test_watchdog_restarts_a_stalled_dispatch_with_a_new_epoch(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=6, chips=2)
    age(delivery_db, w.campaign_id)
    d = RecordingDispatcher()
    sch = scheduler(delivery_db, dispatcher=d)
    assert w.cid in sch.kick_stalled()
    starts = [x for x in d.starts if x[0] == w.cid]
    assert len(starts) == 1 and starts[0][1] == 2 == epoch_of(delivery_db, w.campaign_id)
    assert sorted(ln.chip_id for ln in starts[0][2]) == sorted(str(c) for c in w.chip_ids)
    with delivery_db.session() as s:
        assert s.query(AuditEvent).filter_by(entity_id=w.cid, action="campaign.dispatch_restart").count() == 1
    # The restart counts as lane activity: no second kick before the lanes had time to lease.
    assert w.cid not in sch.kick_stalled()
    # The old epoch's lanes are fenced; the new one leases.
    assert leases.lease_messages(delivery_db, w.cid, w.chip(0), 1, 10, 60, "old").messages == []
    assert len(leases.lease_messages(delivery_db, w.cid, w.chip(0), 2, 10, 60, "new").messages) == 3


def test_watchdog_leaves_live_lanes_alone(delivery_db: Database) -> None:
    sch = scheduler(delivery_db, stall=30)
    # A lane that leased recently (heartbeat) is alive even between sends.
    w = make_world(delivery_db, contacts=4, chips=1)
    age(delivery_db, w.campaign_id)
    leases.lease_messages(delivery_db, w.cid, w.chip(0), 1, 1, 1, "lane")
    set_messages(delivery_db, w.message_ids[:1], state=3)
    # A live lease means a lane is working on it.
    w2 = make_world(delivery_db, contacts=4, chips=1)
    age(delivery_db, w2.campaign_id)
    set_messages(delivery_db, w2.message_ids[:1], state=2, lease_expires_at=text("now() + interval '1 hour'"))
    # Recently (re)started: its lanes are still being queued.
    w3 = make_world(delivery_db, contacts=4, chips=1)
    # Paused: nothing to do.
    w4 = make_world(delivery_db, contacts=4, chips=1, state=PAUSED)
    age(delivery_db, w4.campaign_id)
    kicked = sch.kick_stalled()
    assert not {w.cid, w2.cid, w3.cid, w4.cid} & set(kicked)
    # Expired lease + silent lanes: that one is stalled.
    set_messages(delivery_db, w2.message_ids[:1], lease_expires_at=text("now() - interval '1 second'"))
    assert restarted(delivery_db, w2, sch.kick_stalled())


def _lanes_silent_since(db: Database, campaign_id: uuid.UUID, seconds: int = 3600) -> None:
    with db.transaction() as s:
        s.execute(text("UPDATE delivery_lanes SET last_seen_at = now() - make_interval(secs => :s)"
                       " WHERE campaign_id = :c"), {"s": seconds, "c": str(campaign_id)})


def test_watchdog_leaves_a_lane_alone_until_the_end_of_the_wait_it_reported(delivery_db: Database) -> None:
    """A lane held back by a cap reports until when (ReportLaneWait): no restart before that time
    plus stall_seconds; a wait reported under an older epoch, or one long over, excuses nothing."""
    sch = scheduler(delivery_db, stall=30)
    waiting, stale, over = (make_world(delivery_db, contacts=4, chips=1) for _ in range(3))
    for w, resume in ((waiting, 1800), (stale, 1800), (over, -60)):
        age(delivery_db, w.campaign_id)
        out = lane_waits.report_lane_wait(delivery_db, w.cid, w.chip(0), 1,
                                          datetime.now(UTC) + timedelta(seconds=resume), "hourly cap")
        assert out.recorded
        _lanes_silent_since(delivery_db, w.campaign_id)  # only the reported wait speaks for the lane
    with delivery_db.transaction() as s:  # a restart since: the wait was the old epoch's
        s.execute(text("UPDATE campaigns SET dispatch_epoch = 2 WHERE id = :c"), {"c": stale.cid})
    kicked = sch.kick_stalled()
    assert restarted(delivery_db, stale, kicked, epoch=2) and restarted(delivery_db, over, kicked)
    assert waiting.cid not in kicked and epoch_of(delivery_db, waiting.campaign_id) == 1
    with delivery_db.session() as s:
        assert s.query(AuditEvent).filter_by(entity_id=waiting.cid, action="campaign.dispatch_restart").count() == 0


def _window_settings(start: int, end: int) -> dict[str, Any]:
    return {"pacing": {"intervalMinSeconds": 0, "intervalMaxSeconds": 0,
                       "window": {"timezone": "UTC", "startHour": start, "endHour": end}}}


def test_watchdog_leaves_lanes_waiting_for_their_sending_window(delivery_db: Database) -> None:
    """Lanes silent because their window is closed, or opened less than stall_seconds ago, are not
    restarted (no new epoch, no audit event); a window open for longer does not excuse silence."""
    hour = datetime.now(UTC).hour
    closed_start = (hour + 2) % 24
    closed = make_world(delivery_db, contacts=2, chips=2,
                        settings=_window_settings(closed_start, closed_start + 1))
    just_opened = make_world(delivery_db, contacts=2, chips=1, settings=_window_settings(hour, hour + 1))
    always = make_world(delivery_db, contacts=2, chips=1, settings=_window_settings(0, 24))
    for w in (closed, just_opened, always):
        age(delivery_db, w.campaign_id, 4 * 3600)
    d = RecordingDispatcher()
    kicked = scheduler(delivery_db, dispatcher=d, stall=3 * 3600).kick_stalled()
    assert always.cid in kicked
    assert closed.cid not in kicked and just_opened.cid not in kicked
    assert {x[0] for x in d.starts} == {always.cid}
    for w in (closed, just_opened):
        assert epoch_of(delivery_db, w.campaign_id) == 1
        with delivery_db.session() as s:
            assert s.query(AuditEvent).filter_by(entity_id=w.cid, action="campaign.dispatch_restart").count() == 0


def test_window_open_since() -> None:
    from campaign_service.pacing import window_open_since

    sp = "America/Sao_Paulo"  # UTC-3, no DST since 2019
    business = res.SendingWindow(timezone=sp, start_hour=9, end_hour=18, weekdays=[1, 2, 3, 4, 5])

    def at(y: int, mo: int, d: int, h: int, mi: int = 0) -> float:
        return datetime(y, mo, d, h + 3, mi, tzinfo=UTC).timestamp()  # local time in Sao Paulo

    assert window_open_since(business, at(2026, 11, 25, 10, 30)) == at(2026, 11, 25, 9)  # Wednesday
    assert window_open_since(business, at(2026, 11, 25, 18, 0)) is None
    assert window_open_since(business, at(2026, 11, 25, 8, 59)) is None
    assert window_open_since(business, at(2026, 11, 28, 10, 0)) is None  # Saturday
    weekdays = res.SendingWindow(timezone=sp, start_hour=0, end_hour=24, weekdays=[1, 2, 3, 4, 5])
    assert window_open_since(weekdays, at(2026, 11, 24, 5, 10)) == at(2026, 11, 23, 0)  # Tuesday -> Monday 00:00
    always = res.SendingWindow(timezone="UTC", start_hour=0, end_hour=0)  # end 0 means 24
    now = datetime(2026, 11, 25, 12, 40, tzinfo=UTC).timestamp()
    assert window_open_since(always, now) == datetime(2026, 11, 17, 12, tzinfo=UTC).timestamp()  # the horizon


def test_watchdog_a_released_long_lease_does_not_delay_the_restart(delivery_db: Database) -> None:
    """A lane leased a long batch and released it when it stopped: once the lease is gone, silence
    for stall_seconds is enough (the lease length does not count)."""
    w = make_world(delivery_db, contacts=2, chips=1)
    age(delivery_db, w.campaign_id)
    with delivery_db.transaction() as s:
        s.execute(text("""INSERT INTO delivery_lanes (campaign_id, chip_id, last_seen_at, lease_seconds)
                          VALUES (:c, :chip, now() - interval '10 seconds', 600)"""),
                  {"c": w.cid, "chip": w.chip(0)})
    assert w.cid not in scheduler(delivery_db, stall=30).kick_stalled()
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE delivery_lanes SET last_seen_at = now() - interval '31 seconds' "
                       "WHERE campaign_id = :c"), {"c": w.cid})
    assert w.cid in scheduler(delivery_db, stall=30).kick_stalled()


def test_watchdog_dispatcher_down_keeps_the_epoch(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=2, chips=1)
    age(delivery_db, w.campaign_id)
    sch = scheduler(delivery_db, dispatcher=RecordingDispatcher(fail=True))
    assert w.cid not in sch.kick_stalled()
    assert epoch_of(delivery_db, w.campaign_id) == 1
    with delivery_db.session() as s:
        assert s.execute(text("SELECT count(*) FROM delivery_lanes WHERE campaign_id = :c"),
                         {"c": w.cid}).scalar_one() == 0


# ---------------------------------------------------------------- chips out of rotation


def test_sweep_moves_released_messages_off_a_restricted_chip(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=6, chips=2)
    on0 = [m.id for m in message_rows(delivery_db, w.campaign_id) if m.chip_id == w.chip_ids[0]]
    # One never-attempted expired lease and one attempted one (its outcome must be checked on chip 0).
    set_messages(delivery_db, on0[:1], state=2, lease_expires_at=text("now() - interval '1 second'"))
    set_messages(delivery_db, on0[1:2], state=2, waha_message_id="wa-1",
                 lease_expires_at=text("now() - interval '1 second'"))
    # The chip goes out of rotation last: the session's campaign servers run this same sweep every
    # second on this database, and must never see the messages half set up.
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE chips SET state = 3 WHERE id = :c"), {"c": w.chip(0)})
    scheduler(delivery_db).sweep_unusable_chips()
    with delivery_db.session() as s:
        moves = s.query(AuditEvent).filter_by(entity_id=w.cid, action="campaign.redistribute").count()
    # Swept exactly once (by this call, or by a server's tick just before it: which one cannot be told
    # apart here), and a second sweep finds nothing left to move.
    assert moves == 1
    assert w.cid not in scheduler(delivery_db).sweep_unusable_chips()
    rows = {m.id: m for m in message_rows(delivery_db, w.campaign_id)}
    assert rows[on0[0]].state == 1 and rows[on0[0]].chip_id == w.chip_ids[1]
    assert rows[on0[1]].state == 2 and rows[on0[1]].chip_id == w.chip_ids[0]
    assert rows[on0[2]].state == 1 and rows[on0[2]].chip_id == w.chip_ids[1]
    check_counters(delivery_db, w.campaign_id)


def test_sweep_auto_pauses_when_no_chip_is_left(delivery_db: Database, events: RecordingEvents) -> None:
    w = make_world(delivery_db, contacts=2, chips=1)
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE chips SET state = 2 WHERE id = :c"), {"c": w.chip(0)})
    scheduler(delivery_db, events).sweep_unusable_chips()
    # UNAVAILABLE (session not WORKING) is transient: the campaign keeps running on it.
    assert campaign_row(delivery_db, w.campaign_id).state == RUNNING and events.states(w.cid) == []
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE chips SET state = 3 WHERE id = :c"), {"c": w.chip(0)})
    scheduler(delivery_db, events).sweep_unusable_chips()
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == PAUSED and row.state_reason == "auto-paused: no usable chip left"
    assert events.states(w.cid) == ["PAUSED"]


# ---------------------------------------------------------------- scheduled starts


def test_start_due_calls_start_for_due_scheduled_campaigns_only(delivery_db: Database) -> None:
    due = make_world(delivery_db, contacts=1, chips=1, state=2)
    later = make_world(delivery_db, contacts=1, chips=1, state=2)
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE campaigns SET schedule_time = now() - interval '1 second' WHERE id = :c"),
                  {"c": due.cid})
        s.execute(text("UPDATE campaigns SET schedule_time = now() + interval '1 hour' WHERE id = :c"),
                  {"c": later.cid})
    ops = RecordingOps()
    assert due.cid in scheduler(delivery_db, ops=ops).start_due()
    assert due.campaign_id in ops.calls and later.campaign_id not in ops.calls


def test_start_due_refused_start_is_noted_and_retried_later(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=0, chips=1, state=2)
    with delivery_db.transaction() as s:
        s.execute(text("UPDATE campaigns SET schedule_time = now() - interval '1 second' WHERE id = :c"),
                  {"c": w.cid})
    ops = RecordingOps(refuse=True)
    sch = scheduler(delivery_db, ops=ops)
    assert sch.start_due() == []
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == 2 and row.state_reason.startswith("scheduled start failed: the campaign has no contacts")
    sch.start_due()
    assert ops.calls.count(w.campaign_id) == 1  # backed off, not hammered every tick


def test_scheduler_thread_runs_and_stops(delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=1, chips=1)
    set_messages(delivery_db, w.message_ids, state=7)
    sch = scheduler(delivery_db).start()
    try:
        deadline = time.monotonic() + 10
        while campaign_row(delivery_db, w.campaign_id).state != 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sch.stop()
    assert campaign_row(delivery_db, w.campaign_id).state == 6
    assert sch._thread is None


def test_scheduler_survives_a_database_outage() -> None:
    dead = Database("postgresql+psycopg2://postgres@127.0.0.1:9/nowhere", pool_size=1)
    sch = scheduler(dead)
    out = sch.run_once()
    assert out.errors == 4 and out.started == out.kicked == []
    dead.dispose()


# ---------------------------------------------------------------- the whole stack


@pytest.mark.slow
def test_scheduled_campaign_is_started_by_the_scheduler(stack: dict[str, ServiceProcess],
                                                        campaign_channel: grpc.Channel, api_key: str,
                                                        sandbox_url: str) -> None:
    api = Api(campaign_channel, api_key)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(datetime.now(UTC) + timedelta(seconds=2))
    camp = api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name="scheduled", templates=[res.MessageTemplate(text="Oi {{name}}")], chip_ids=[chip.id],
        schedule_time=when, settings=res.CampaignSettings(
            pacing=res.Pacing(interval_min_seconds=0, interval_max_seconds=0),
            camouflage=res.Camouflage(send_seen=False, typing=False)))), metadata=api.md)
    assert camp.state == res.CAMPAIGN_STATE_SCHEDULED
    api.import_phones(camp.id, phones(5))
    # The isolated stacks of other tests share this database, so their schedulers may be the one that
    # starts it (and hand it to their own dispatcher): the start at its time is what is checked here.
    started = api.wait(camp.id, lambda c: c.state != res.CAMPAIGN_STATE_SCHEDULED, timeout=30)
    assert started.state in (res.CAMPAIGN_STATE_RUNNING, res.CAMPAIGN_STATE_COMPLETED)
    assert started.HasField("start_time") and started.start_time.ToDatetime(UTC) >= when.ToDatetime(UTC)
    if started.state == res.CAMPAIGN_STATE_RUNNING:
        try:
            api.cancel(camp.id)
        except grpc.RpcError as e:  # it may have completed meanwhile
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e


@pytest.fixture(scope="module")
def watchdog_replica(stack: dict[str, ServiceProcess], stack_env: dict[str, str],
                     workdir: Path) -> Iterator[ServiceProcess]:
    """A second campaign_service replica on the same database whose watchdog is impatient (2 s)."""
    port = free_port()
    p = ServiceProcess("campaign-service-watchdog", "campaign_service.server", [],
                       {**stack_env, "CAMPAIGN_LISTEN": f"127.0.0.1:{port}", "WHAGO_WATCHDOG_STALL_SECONDS": "2"},
                       workdir / "logs", port=port).start()
    yield p
    p.stop()


@pytest.mark.slow
def test_watchdog_finishes_a_campaign_whose_lanes_vanished(watchdog_replica: ServiceProcess,
                                                           campaign_channel: grpc.Channel,
                                                           dispatcher_channel: grpc.Channel, api_key: str,
                                                           sandbox_url: str, live_db: Database) -> None:
    """The dispatcher forgets the campaign mid-run (its lanes stop, the database still says RUNNING):
    the watchdog restarts the dispatch under a new epoch and every contact gets exactly one message."""
    api = Api(campaign_channel, api_key)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.1, 0.2))
    camp = api.campaign([chip])
    numbers = phones(30)
    api.import_phones(camp.id, numbers)
    started = api.start(camp.id)
    api.wait(camp.id, lambda c: c.sent_count >= 3, timeout=30)
    dstub = dispatcher_grpc.DispatcherServiceStub(dispatcher_channel)
    dstub.CancelDispatch(dispatcher_pb2.CancelDispatchRequest(campaign_id=camp.id, epoch=started_epoch(
        live_db, camp.id) + 1), metadata=auth(SERVICE_TOKEN))
    mid = api.get(camp.id)
    assert mid.state == res.CAMPAIGN_STATE_RUNNING and mid.sent_count < 30
    done = api.wait(camp.id, lambda c: c.state == res.CAMPAIGN_STATE_COMPLETED, timeout=90)
    assert done.sent_count == 30 and done.failed_count == 0
    control = SandboxControl(sandbox_url)
    per_chat = collections.Counter(s["chat_id"] for s in control.sends(session=chip.waha_session))
    assert len(per_chat) == 30 and max(per_chat.values()) == 1
    with live_db.session() as s:
        assert s.query(AuditEvent).filter_by(entity_id=camp.id, action="campaign.dispatch_restart").count() >= 1
    assert started.state == res.CAMPAIGN_STATE_RUNNING


def started_epoch(db: Database, campaign_id: str) -> int:
    return epoch_of(db, uuid.UUID(campaign_id))


@pytest.mark.slow
def test_a_lane_held_by_its_hourly_cap_is_not_restarted_by_the_watchdog(watchdog_replica: ServiceProcess,
                                                                       campaign_channel: grpc.Channel,
                                                                       api_key: str, sandbox_url: str,
                                                                       live_db: Database) -> None:
    """The whole stack, with a replica whose watchdog gives up on silent lanes after 2 s: a chip
    capped at 2 sends an hour sends 2, then its lane defers for the rest of the hour and says so;
    the campaign stays RUNNING under the same epoch, with no restart, however long it waits."""
    api = Api(campaign_channel, api_key)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, max_per_hour=2)
    camp = api.campaign([chip])
    api.import_phones(camp.id, phones(4))
    api.start(camp.id)
    api.wait(camp.id, lambda c: c.sent_count >= 2, timeout=30)
    epoch = started_epoch(live_db, camp.id)
    with live_db.session() as s:
        def lane() -> Any:
            return s.execute(text("SELECT resume_at, resume_epoch FROM delivery_lanes WHERE campaign_id = :c"),
                             {"c": camp.id}).one_or_none()
        deadline = time.time() + 15
        while (row := lane()) is None or row.resume_at is None:
            assert time.time() < deadline, "the capped lane never reported its wait"
            time.sleep(0.2)
            s.rollback()
    assert row.resume_epoch == epoch and row.resume_at.timestamp() > time.time() + 3000

    time.sleep(7)  # over three stall periods of the impatient watchdog

    mid = api.get(camp.id)
    assert mid.state == res.CAMPAIGN_STATE_RUNNING and mid.sent_count == 2
    assert started_epoch(live_db, camp.id) == epoch
    with live_db.session() as s:
        assert s.query(AuditEvent).filter_by(entity_id=camp.id, action="campaign.dispatch_restart").count() == 0
    api.cancel(camp.id)
