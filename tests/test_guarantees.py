"""Issue 3's dispatcher guarantees (DESIGN.md "Guarantees"), proven through the whole real stack:
campaign_service on PostgreSQL, the dispatcher server, arq worker processes on Redis, and the WAHA
sandbox. No part is faked; faults are injected at the sandbox, and crashes are real signals.

Non-destructive tests use the session's stack. Destructive ones (SIGKILL a worker, restart Redis,
replace the workers) and the timeout test (short WAHA timeout) use a dedicated stack from
`isolated_stack`: its own Redis, campaign server, dispatcher server and workers, sharing the
session's PostgreSQL and sandbox, with short lane slices so a crashed worker's lane re-runs fast.
"""

from __future__ import annotations

import collections
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
import pytest
import sqlalchemy as sa

from devstack.servers import free_port
from dispatcher_service.waha import message_ids
from tests.conftest import SANDBOX_API_KEY, SERVICE_TOKEN, IsolatedStack
from tests.helpers import Ops, chat_id, get_dispatch, phones, scrape, value, wait_for
from tests.test_campaign_support import engine  # noqa: F401 - fixture
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import resources_pb2 as res
from whago.dispatcher.v1 import dispatcher_service_pb2 as dpb

SENT, FAILED, PENDING, SENDING = (res.MESSAGE_STATE_SENT, res.MESSAGE_STATE_FAILED, res.MESSAGE_STATE_PENDING,
                                  res.MESSAGE_STATE_SENDING)
COMPLETED, PAUSED, CANCELLED = res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_PAUSED, res.CAMPAIGN_STATE_CANCELLED
KEY = SANDBOX_API_KEY
# Chip pacing for the failure tests: paced (one fenced send at a time) and full speed, where a lane
# sends in bursts under one fence token and a failure ends the burst at that message.
PACED_AND_BURST = [(0.02, 0.04), (0.0, 0.0)]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iso_stack(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    # campaign_service's metrics: how many LeaseMessages a campaign took
    with isolated_stack("guarantees", CAMPAIGN_METRICS_LISTEN=f"127.0.0.1:{free_port()}") as st:
        yield st


@pytest.fixture()
def iso(iso_stack: IsolatedStack) -> Iterator[IsolatedStack]:
    """The dedicated stack, with at least one live worker (an earlier test may have killed them)."""
    iso_stack.workers[:] = [w for w in iso_stack.workers if w.alive()]
    if not iso_stack.workers:
        iso_stack.start_worker()
    yield iso_stack


@pytest.fixture()
def iso_api(iso: IsolatedStack, api_key: str) -> Ops:
    """A fresh user on the dedicated stack (its campaign server talks to its dispatcher)."""
    return Ops(iso.campaign_channel, api_key)


@pytest.fixture(scope="module")
def waha_ids_stack(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    """A dedicated stack whose worker asks WAHA for every message id (DISPATCH_MESSAGE_IDS=waha)."""
    with isolated_stack("guarantees-waha-ids", DISPATCH_MESSAGE_IDS="waha") as st:
        yield st


@pytest.fixture()
def waha_ids_api(waha_ids_stack: IsolatedStack, api_key: str) -> Ops:
    return Ops(waha_ids_stack.campaign_channel, api_key)


# -- helpers --------------------------------------------------------------------------------------

def sends_by_chat(control: SandboxControl, chips: Iterable[res.Chip]) -> collections.Counter[str]:
    """Non-duplicate 201 sends at the sandbox, per chat id."""
    return collections.Counter(s["chat_id"] for c in chips for s in control.sends(session=c.waha_session))


def delivered_by_chat(control: SandboxControl, chips: Iterable[res.Chip]) -> collections.Counter[str]:
    """Messages the sandbox holds (unique by WAHA id), per chat id."""
    return collections.Counter(m["chatId"] for c in chips for m in control.messages(session=c.waha_session))


def gaps(control: SandboxControl, chip: res.Chip) -> list[float]:
    """Seconds between consecutive sendText arrivals of one chip at the sandbox."""
    times = sorted(r["ts"] for r in control.requests(session=chip.waha_session, path="/api/sendText"))
    return [b - a for a, b in itertools.pairwise(times)]


def assert_each_once(control: SandboxControl, chips: Iterable[res.Chip], numbers: list[str]) -> None:
    """Every contact got exactly one message at the sandbox, and nobody else got one."""
    chips = list(chips)
    expected = {chat_id(p) for p in numbers}
    for counted in (sends_by_chat(control, chips), delivered_by_chat(control, chips)):
        assert set(counted) == expected, f"missing {len(expected - set(counted))}, extra {set(counted) - expected}"
        twice = {k: v for k, v in counted.items() if v > 1}
        assert not twice, f"contacts messaged more than once: {twice}"


def run_with_a_hung_first_send(ops: Ops, sandbox_url: str, control: SandboxControl, n: int,
                               interval: tuple[float, float] = (0.0, 0.0)) -> tuple[res.Chip, res.Campaign, list[str]]:
    """A one-chip campaign of n contacts whose first send is delivered, then hangs past the WAHA
    timeout (2 s on the dedicated stacks). Returns (chip, campaign, numbers) once it completed with
    all n sent and none failed."""
    chip = ops.chip(sandbox_url, KEY, interval=interval)
    control.set_session(chip.waha_session, fail_next=[{"timeout": True, "deliver": True, "count": 1}])
    camp = ops.campaign([chip])
    numbers = ops.start_sending(camp.id, n)
    done = ops.wait_final(camp.id, timeout=60)
    assert done.state == COMPLETED and done.sent_count == n and done.failed_count == 0
    return chip, camp, numbers


def worker_logs(stack: IsolatedStack) -> str:
    return "\n".join(f"--- {w.name}\n{w.tail(25)}" for w in stack.workers)


# -- 1. confirmed stop ----------------------------------------------------------------------------

def test_cancel_at_full_speed_on_5_chips_fails_open_messages_as_cancelled_and_counts_add_up(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    """Extends test_dispatcher_e2e's cancel: besides no WAHA request after CancelCampaign returned,
    every message not sent is FAILED "cancelled by user", the counters match the rows, and exactly
    the messages recorded SENT reached the sandbox."""
    chips = [api.chip(sandbox_url, KEY) for _ in range(5)]
    sessions = {c.waha_session for c in chips}
    for s in sessions:
        control.set_session(s, latency_ms=20)
    camp = api.campaign(chips)  # interval 0, camouflage off: full speed
    api.start_sending(camp.id, 600, sent_at_least=40, timeout=60)

    cancelled = api.cancel(camp.id)
    returned = time.time()

    assert cancelled.state == CANCELLED and cancelled.state_reason == "cancelled by user"
    time.sleep(1.5)
    after = [r for r in control.requests(since=returned) if r.get("session") in sessions]
    assert after == [], f"WAHA got {len(after)} requests after CancelCampaign returned: {after[:3]}"
    final = api.get(camp.id)
    msgs = api.messages(camp.id)
    by_state = collections.Counter(m.state for m in msgs)
    assert len(msgs) == 600 and set(by_state) <= {SENT, FAILED}, by_state
    assert {m.failure_reason for m in msgs if m.state == FAILED} == {"cancelled by user"}
    assert (final.sent_count, final.failed_count, final.pending_count) == (by_state[SENT], by_state[FAILED], 0)
    assert 40 <= final.sent_count < 600
    at_waha = sends_by_chat(control, chips)
    assert max(at_waha.values()) == 1
    assert set(at_waha) == {m.chat_id for m in msgs if m.state == SENT}, "SENT rows == sends at WAHA"


def test_pause_at_full_speed_on_5_chips_then_resume_completes_the_rest_nobody_twice(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chips = [api.chip(sandbox_url, KEY) for _ in range(5)]
    sessions = {c.waha_session for c in chips}
    for s in sessions:
        control.set_session(s, latency_ms=20)
    camp = api.campaign(chips)
    numbers = api.start_sending(camp.id, 400, sent_at_least=40, timeout=60)

    paused = api.pause(camp.id)
    returned = time.time()

    assert paused.state == PAUSED
    time.sleep(1.5)
    after = [r for r in control.requests(since=returned) if r.get("session") in sessions]
    assert after == [], f"WAHA got {len(after)} requests after PauseCampaign returned: {after[:3]}"
    wait_for(lambda: SENDING not in {m.state for m in api.messages(camp.id)}, 20, "leases released after pause")
    msgs = api.messages(camp.id)
    assert {m.state for m in msgs} == {SENT, PENDING}, "pause fails nothing: the rest stays PENDING"
    mid = api.get(camp.id)
    assert mid.state == PAUSED and 40 <= mid.sent_count < 400 and mid.failed_count == 0
    assert set(sends_by_chat(control, chips)) == {m.chat_id for m in msgs if m.state == SENT}

    api.resume(camp.id)
    done = api.wait_final(camp.id, timeout=90)

    assert done.state == COMPLETED and done.sent_count == 400 and done.failed_count == 0
    assert_each_once(control, chips, numbers)


# -- 2./3. nothing lost, at most once, across crashes ------------------------------------------------

def test_worker_sigkilled_mid_campaign_a_new_worker_completes_it_each_contact_once(
        iso: IsolatedStack, iso_api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chips = [iso_api.chip(sandbox_url, KEY, interval=(0.05, 0.1)) for _ in range(3)]
    camp = iso_api.campaign(chips)
    numbers = iso_api.start_sending(camp.id, 90, sent_at_least=10, timeout=60)

    iso.kill_workers()  # SIGKILL mid-slice: no drain, no release, leases and arq jobs left behind
    at_kill = iso_api.get(camp.id)
    assert at_kill.sent_count < 90 and at_kill.state == res.CAMPAIGN_STATE_RUNNING
    iso.start_worker("guarantees-replacement")
    # arq re-runs the dead jobs once their in-progress keys expire (job timeout 10 s + 10 s); the
    # leases expire before that, so the re-runs lease the messages again (and look up any send
    # that may have left).
    try:
        done = iso_api.wait_final(camp.id, timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{worker_logs(iso)}") from None

    assert done.state == COMPLETED and done.sent_count == 90 and done.failed_count == 0
    msgs = iso_api.messages(camp.id)
    assert collections.Counter(m.state for m in msgs) == {SENT: 90}, "no message stays SENDING"
    assert_each_once(control, chips, numbers)


def test_redis_restarted_mid_campaign_worker_reconnects_and_completes_each_contact_once(
        iso: IsolatedStack, iso_api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chips = [iso_api.chip(sandbox_url, KEY, interval=(0.05, 0.1)) for _ in range(2)]
    camp = iso_api.campaign(chips)
    numbers = iso_api.start_sending(camp.id, 80, sent_at_least=10, timeout=60)

    iso.redis.restart()  # same port, data kept (append-only file)
    try:
        done = iso_api.wait_final(camp.id, timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{worker_logs(iso)}") from None

    assert done.state == COMPLETED and done.sent_count == 80 and done.failed_count == 0
    assert all(w.alive() for w in iso.workers), "the worker survived the restart"
    assert_each_once(control, chips, numbers)


def test_two_workers_two_campaigns_sharing_a_chip_every_chip_keeps_its_gap_nobody_twice(
        iso: IsolatedStack, iso_api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    for w in iso.workers:
        w.stop()
    iso.workers.clear()
    # Two jobs at most per worker and four lanes: both workers must run lanes.
    workers = [iso.start_worker(f"guarantees-pair-{i}", DISPATCH_MAX_JOBS="2") for i in range(2)]
    try:
        shared = iso_api.chip(sandbox_url, KEY, interval=(0.3, 0.5))
        own = [iso_api.chip(sandbox_url, KEY, interval=(0.3, 0.5)) for _ in range(2)]
        camps = [iso_api.campaign([shared, own[i]]) for i in range(2)]
        numbers = [phones(12) for _ in camps]
        for c, n in zip(camps, numbers, strict=True):
            iso_api.import_phones(c.id, n)
        for c in camps:
            iso_api.start(c.id)
        for c in camps:
            assert iso_api.wait_final(c.id, timeout=90).state == COMPLETED

        for chip in (shared, *own):
            g = gaps(control, chip)
            assert g and min(g) >= 0.3 - 0.02, f"{chip.waha_session}: min gap {min(g):.3f}s"
        assert len(control.sends(session=shared.waha_session)) == 12  # 6 of each campaign
        assert_each_once(control, (shared, *own), numbers[0] + numbers[1])
        for w in workers:
            ran = [ln for ln in w.log_path.read_text().splitlines()
                   if "slice start" in ln and any(c.id in ln for c in camps)]
            assert ran, f"{w.name} ran no lane of these campaigns"
    finally:
        for w in workers:
            w.stop()
        iso.workers.clear()


# -- 5./6. chips leaving rotation -------------------------------------------------------------------

@pytest.mark.parametrize("interval", PACED_AND_BURST, ids=["paced", "full-speed-bursts"])
def test_restricted_chip_463_is_restricted_and_its_messages_go_round_robin_to_healthy_chips(
        api: Ops, sandbox_url: str, control: SandboxControl, interval: tuple[float, float]) -> None:
    chips = [api.chip(sandbox_url, KEY, interval=interval) for _ in range(3)]
    control.set_session(chips[0].waha_session, restricted=True)  # every send answers 500 + error 463
    camp = api.campaign(chips)
    numbers = api.start_sending(camp.id, 30)

    done = api.wait_final(camp.id, timeout=60)

    assert done.state == COMPLETED and done.sent_count == 30 and done.failed_count == 0
    banned = api.get_chip(chips[0].id)
    assert banned.state == res.CHIP_STATE_RESTRICTED and "463" in banned.state_reason
    assert control.sends(session=chips[0].waha_session) == []
    per_chip = collections.Counter(m.chip_id for m in api.messages(camp.id))
    assert per_chip == {chips[1].id: 15, chips[2].id: 15}, "its 10 moved 5/5 (round-robin)"
    assert_each_once(control, chips, numbers)


def test_all_chips_restricted_auto_pauses_the_campaign_with_a_reason(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chips = [api.chip(sandbox_url, KEY, interval=(0.02, 0.04)) for _ in range(2)]
    for c in chips:
        control.set_session(c.waha_session, restricted=True)
    camp = api.campaign(chips)
    api.import_phones(camp.id, phones(10))
    api.start(camp.id)

    paused = api.wait(camp.id, lambda c: c.state == PAUSED, timeout=60)

    assert "no usable chip" in paused.state_reason
    assert {api.get_chip(c.id).state for c in chips} == {res.CHIP_STATE_RESTRICTED}
    wait_for(lambda: SENDING not in {m.state for m in api.messages(camp.id)}, 20, "leases released")
    assert {m.state for m in api.messages(camp.id)} == {PENDING} and paused.failed_count == 0
    assert sends_by_chat(control, chips) == {}


def test_session_not_working_422_chip_unavailable_nothing_failed_and_back_to_active(
        api: Ops, sandbox_url: str, control: SandboxControl, dispatcher_channel: grpc.Channel) -> None:
    """Chip A's session is STOPPED: A is UNAVAILABLE, its lane backs off re-checking the session,
    no message fails (campaign_service moves A's PENDING messages to the healthy chip B); once the
    session is WORKING again the lane reports A ACTIVE, and the campaign completes."""
    a = api.chip(sandbox_url, KEY, interval=(0.02, 0.04))
    b = api.chip(sandbox_url, KEY, interval=(0.3, 0.35))
    control.set_session(a.waha_session, status="STOPPED")
    camp = api.campaign([a, b])
    numbers = api.start_sending(camp.id, 20)

    wait_for(lambda: api.get_chip(a.id).state == res.CHIP_STATE_UNAVAILABLE, 30, "chip A UNAVAILABLE")
    assert "422" in api.get_chip(a.id).state_reason or "STOPPED" in api.get_chip(a.id).state_reason
    wait_for(lambda: any(ln.chip_id == a.id and ln.state == dpb.LANE_STATE_BACKING_OFF
                         for ln in get_dispatch(dispatcher_channel, SERVICE_TOKEN, camp.id).lanes),
             15, "lane A BACKING_OFF")
    assert FAILED not in {m.state for m in api.messages(camp.id)}
    checked_at = time.time()
    control.set_session(a.waha_session, status="WORKING")
    wait_for(lambda: api.get_chip(a.id).state == res.CHIP_STATE_ACTIVE, 30, "chip A ACTIVE again")
    assert control.requests(session=a.waha_session, path=f"/api/sessions/{a.waha_session}", since=checked_at)

    done = api.wait_final(camp.id, timeout=60)
    assert done.state == COMPLETED and done.sent_count == 20 and done.failed_count == 0
    assert_each_once(control, (a, b), numbers)


def test_single_chip_session_stops_mid_run_lane_backs_off_and_completes_when_working_again(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    """With no other chip, a STOPPED session (422) fails nothing and pauses nothing: the chip is
    UNAVAILABLE, its messages stay PENDING, the lane backs off re-checking the session, and once it
    is WORKING again the same lane sends exactly the rest."""
    chip = api.chip(sandbox_url, KEY, interval=(0.1, 0.15))
    camp = api.campaign([chip])
    numbers = api.start_sending(camp.id, 24, sent_at_least=4, timeout=30)

    control.set_session(chip.waha_session, status="STOPPED")
    wait_for(lambda: api.get_chip(chip.id).state == res.CHIP_STATE_UNAVAILABLE, 30, "chip UNAVAILABLE")
    wait_for(lambda: SENDING not in {m.state for m in api.messages(camp.id)}, 20, "leases released")
    mid = api.get(camp.id)
    assert mid.state == res.CAMPAIGN_STATE_RUNNING and mid.failed_count == 0 and mid.sent_count < 24
    assert {m.state for m in api.messages(camp.id)} == {SENT, PENDING}

    control.set_session(chip.waha_session, status="WORKING")
    done = api.wait_final(camp.id, timeout=90)
    assert done.state == COMPLETED and done.sent_count == 24 and done.failed_count == 0
    assert api.get_chip(chip.id).state == res.CHIP_STATE_ACTIVE
    assert_each_once(control, [chip], numbers)


# -- 7./8./9. failure handling ---------------------------------------------------------------------

@pytest.mark.parametrize("interval", PACED_AND_BURST, ids=["paced", "full-speed-bursts"])
def test_send_timing_out_after_reaching_waha_is_found_by_its_id_and_not_resent(
        iso: IsolatedStack, iso_api: Ops, sandbox_url: str, control: SandboxControl,
        interval: tuple[float, float]) -> None:
    chip, camp, numbers = run_with_a_hung_first_send(iso_api, sandbox_url, control, 5, interval)

    texts = control.requests(session=chip.waha_session, path="/api/sendText")
    hung = [r for r in texts if r.get("fault")]
    assert len(hung) == 1
    chat = hung[0]["chat_id"]
    assert [r for r in texts if r["chat_id"] == chat] == hung, "the uncertain send was not sent again"
    assert not any(r["duplicate"] for r in texts)
    lookups = control.requests(session=chip.waha_session, path=f"/chats/{chat}/messages/")
    assert lookups, "it was looked up"
    # by the lane's next slice once the send was over (~7 s: timeout 2 + one more + margin 2), not
    # when its lease ended (this stack's leases last DISPATCH_JOB_TIMEOUT + 5 = 15 s)
    assert lookups[0]["ts"] - hung[0]["ts"] < 12.0, "the uncertain send waited for its lease to end"
    delivered = [m for m in control.messages(session=chip.waha_session) if m["chatId"] == chat]
    assert len(delivered) == 1
    row = next(m for m in iso_api.messages(camp.id) if m.chat_id == chat)
    assert row.state == SENT and row.waha_message_id in (delivered[0]["id"], delivered[0]["short_id"])
    assert set(delivered_by_chat(control, [chip])) == {chat_id(p) for p in numbers}
    assert max(delivered_by_chat(control, [chip]).values()) == 1


def assert_sent_with_recorded_ids(ops: Ops, campaign_id: str, control: SandboxControl, chips: Iterable[res.Chip],
                                  ) -> list[str]:
    """Every sendText carried an id (unique), and each message row holds the id of its own send.
    Returns the ids sent."""
    texts = [r for c in chips for r in control.requests(session=c.waha_session, path="/api/sendText")]
    ids = [r["body"].get("id") for r in texts]
    assert all(ids) and len(set(ids)) == len(ids), ids
    sent = {r["chat_id"]: r["body"]["id"] for r in texts}
    for m in ops.messages(campaign_id):
        assert m.state == SENT and m.waha_message_id in (sent[m.chat_id], f"true_{m.chat_id}_{sent[m.chat_id]}"), m
    return ids


@pytest.mark.parametrize("interval", PACED_AND_BURST, ids=["paced", "full-speed-bursts"])
def test_message_ids_are_made_by_the_worker_in_the_engines_shape_no_new_message_id_request(
        api: Ops, sandbox_url: str, control: SandboxControl, interval: tuple[float, float]) -> None:
    chips = [api.chip(sandbox_url, KEY, interval=interval) for _ in range(2)]
    camp = api.campaign(chips)
    api.import_phones(camp.id, phones(30))
    api.start(camp.id)

    assert api.wait_final(camp.id, timeout=60).sent_count == 30

    ids = assert_sent_with_recorded_ids(api, camp.id, control, chips)
    assert len(ids) == 30 and all(message_ids.PATTERN.fullmatch(i) for i in ids), ids
    asked = [r for c in chips for r in control.requests(session=c.waha_session, path="/new-message-id")]
    assert asked == []


def test_engine_not_keeping_chosen_ids_an_uncertain_send_is_unknown_never_resent(
        iso: IsolatedStack, iso_api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    """WEBJS sends under an id of its own, so a lookup by the chosen id would find nothing and a
    resend could double the message: the lane asks WAHA's engine first and marks it UNKNOWN."""
    control.configure(engine="WEBJS")
    try:
        chip = iso_api.chip(sandbox_url, KEY)
        control.set_session(chip.waha_session, fail_next=[{"timeout": True, "deliver": True, "count": 1}])
        camp = iso_api.campaign([chip])
        numbers = iso_api.start_sending(camp.id, 4)
        done = iso_api.wait_final(camp.id, timeout=60)
    finally:
        control.configure(engine="GOWS")

    assert done.state == COMPLETED and (done.sent_count, done.failed_count) == (3, 1)
    texts = control.requests(session=chip.waha_session, path="/api/sendText")
    hung = [r for r in texts if r.get("fault")]
    assert len(hung) == 1 and [r for r in texts if r["chat_id"] == hung[0]["chat_id"]] == hung, "not resent"
    assert control.requests(since=hung[0]["ts"], path="/api/server/version"), "the engine was asked"
    row = next(m for m in iso_api.messages(camp.id) if m.chat_id == hung[0]["chat_id"])
    assert row.state == FAILED and "OUTCOME_UNKNOWN" in row.failure_reason, row
    delivered = delivered_by_chat(control, [chip])
    assert set(delivered) == {chat_id(p) for p in numbers} and max(delivered.values()) == 1


def test_with_waha_ids_each_send_carries_an_id_waha_issued_and_an_uncertain_one_is_looked_up(
        waha_ids_api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chip, camp, numbers = run_with_a_hung_first_send(waha_ids_api, sandbox_url, control, 12)

    ids = assert_sent_with_recorded_ids(waha_ids_api, camp.id, control, [chip])
    issued = {r["message_id"] for r in control.requests(session=chip.waha_session, path="/new-message-id")
              if r["status"] == 200}
    assert len(ids) == 12 and set(ids) <= issued, "every send used an id WAHA issued"
    hung = [r for r in control.requests(session=chip.waha_session, path="/api/sendText") if r.get("fault")]
    assert len(hung) == 1
    assert control.requests(session=chip.waha_session, path=f"/chats/{hung[0]['chat_id']}/messages/")
    delivered = delivered_by_chat(control, [chip])
    assert set(delivered) == {chat_id(p) for p in numbers} and max(delivered.values()) == 1


@pytest.mark.parametrize("interval", PACED_AND_BURST, ids=["paced", "full-speed-bursts"])
def test_400_fails_that_message_with_the_reason_and_503_twice_is_retried_then_sent(
        api: Ops, sandbox_url: str, control: SandboxControl, interval: tuple[float, float]) -> None:
    chip = api.chip(sandbox_url, KEY, interval=interval)
    control.set_session(chip.waha_session, fail_next=[{"status": 400, "count": 1}, {"status": 503, "count": 2}])
    camp = api.campaign([chip])
    api.start_sending(camp.id, 3)

    done = api.wait_final(camp.id, timeout=60)

    assert done.state == COMPLETED and (done.sent_count, done.failed_count) == (2, 1)
    statuses: dict[str, list[int]] = collections.defaultdict(list)
    for r in control.requests(session=chip.waha_session, path="/api/sendText"):
        statuses[r["chat_id"]].append(r["status"])
    by_pattern = {tuple(v): k for k, v in statuses.items()}
    assert set(by_pattern) == {(400,), (503, 503, 201), (201,)}, statuses
    rows = {m.chat_id: m for m in api.messages(camp.id)}
    rejected, retried = rows[by_pattern[(400,)]], rows[by_pattern[(503, 503, 201)]]
    assert rejected.state == FAILED and "400" in rejected.failure_reason, rejected
    assert retried.state == SENT and retried.waha_message_id
    assert max(sends_by_chat(control, [chip]).values()) == 1


def test_paced_lane_leases_each_message_once_across_slices(iso_api: Ops, iso: IsolatedStack, sandbox_url: str,
                                                          engine: sa.Engine) -> None:  # noqa: F811
    """6 messages 1.2 s apart on one chip, slices of 4 s: a slice ends when the chip's next slot is
    past its end, before leasing (lane/leasing.py `_check_slot_in_slice`): no message is leased,
    released unsent and leased again (`attempts` stays 1)."""
    chip = iso_api.chip(sandbox_url, KEY, interval=(1.2, 1.2))
    camp = iso_api.campaign([chip], interval=(1.2, 1.2))
    assert iso_api.import_phones(camp.id, phones(6)).imported_count == 6
    iso_api.start(camp.id)
    done = iso_api.wait_final(camp.id, timeout=60)
    assert done.state == COMPLETED and done.sent_count == 6
    with engine.connect() as conn:
        attempts = sorted(conn.execute(sa.text("SELECT attempts FROM campaign_messages WHERE campaign_id = :c"),
                                       {"c": camp.id}).scalars())
    assert attempts == [1] * 6, f"messages leased more than once (a lease released unsent): {attempts}"


def test_lanes_whose_last_lease_drained_them_end_without_another(iso_api: Ops, iso: IsolatedStack,
                                                                 sandbox_url: str) -> None:
    """Two lanes of 4 messages, one at full speed, one 0.5 s apart: each lease comes back short of
    its batch with nothing PENDING after it, so neither lane prefetches nor confirms with an empty
    lease (lane/loop.py `_drained`): 2 leases in all (4 before: one empty lease per lane,
    the ~fifth transaction of a short lane's life). Every message sent once, the campaign completes."""
    port = int(iso.env["CAMPAIGN_METRICS_LISTEN"].rsplit(":", 1)[1])
    before = value(scrape(port), "whago_delivery_leases_total")
    fast = iso_api.chip(sandbox_url, KEY)
    slow = iso_api.chip(sandbox_url, KEY, interval=(0.5, 0.5))
    camp = iso_api.campaign([fast, slow])
    assert iso_api.import_phones(camp.id, phones(8)).imported_count == 8
    iso_api.start(camp.id)
    done = iso_api.wait_final(camp.id, timeout=60)
    assert done.state == COMPLETED and done.sent_count == 8
    assert [m.attempts for m in iso_api.messages(camp.id)] == [1] * 8
    wait_for(lambda: all(ln.state == dpb.LANE_STATE_FINISHED
                         for ln in get_dispatch(iso.dispatcher_channel, SERVICE_TOKEN, camp.id).lanes),
             20, "both lanes finished")
    leases = value(scrape(port), "whago_delivery_leases_total") - before
    assert leases == 2, f"{leases:.0f} leases for two lanes whose first lease took all their messages"


def test_failure_threshold_auto_pauses_the_campaign_with_the_reason(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    # Gaps over 1 s make the lane report each outcome before the next send, so the count is exact.
    chip = api.chip(sandbox_url, KEY, interval=(1.5, 1.6))
    control.set_session(chip.waha_session, fail_next=[{"status": 400, "count": 1000}])
    settings = res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=0, interval_max_seconds=0),
                                    camouflage=res.Camouflage(send_seen=False, typing=False), max_failures=3)
    camp = api.campaign_with([chip], settings)
    api.import_phones(camp.id, phones(12))
    api.start(camp.id)

    paused = api.wait(camp.id, lambda c: c.state == PAUSED, timeout=60)

    assert paused.state_reason == "auto-paused: 3 failures (threshold 3)"
    assert paused.failed_count == 3 and paused.sent_count == 0
    wait_for(lambda: SENDING not in {m.state for m in api.messages(camp.id)}, 20, "leases released")
    states = collections.Counter(m.state for m in api.messages(camp.id))
    assert states == {FAILED: 3, PENDING: 9}


# -- 10. GetDispatch ------------------------------------------------------------------------------

def test_get_dispatch_shows_each_lane_with_chip_state_and_counts(
        api: Ops, sandbox_url: str, control: SandboxControl, dispatcher_channel: grpc.Channel,
        api_key: str) -> None:
    chips = [api.chip(sandbox_url, KEY, interval=(0.15, 0.2)) for _ in range(2)]
    control.set_session(chips[0].waha_session, fail_next=[{"status": 400, "count": 1}])
    camp = api.campaign(chips)
    api.import_phones(camp.id, phones(10))
    api.start(camp.id)

    wait_for(lambda: any(ln.state == dpb.LANE_STATE_RUNNING and ln.next_send_time.seconds > 0
                         for ln in get_dispatch(dispatcher_channel, SERVICE_TOKEN, camp.id).lanes),
             20, "a RUNNING lane with its next send time")
    assert api.wait_final(camp.id, timeout=60).state == COMPLETED
    wait_for(lambda: get_dispatch(dispatcher_channel, SERVICE_TOKEN, camp.id).state == dpb.DISPATCH_STATE_FINISHED,
             20, "dispatch FINISHED")

    d = get_dispatch(dispatcher_channel, SERVICE_TOKEN, camp.id)
    assert d.campaign_id == camp.id
    lanes = {ln.chip_id: ln for ln in d.lanes}
    assert set(lanes) == {c.id for c in chips}
    assert all(ln.state == dpb.LANE_STATE_FINISHED for ln in d.lanes)
    assert (lanes[chips[0].id].sent_count, lanes[chips[0].id].failed_count) == (4, 1)
    assert (lanes[chips[1].id].sent_count, lanes[chips[1].id].failed_count) == (5, 0)
    with pytest.raises(grpc.RpcError) as err:  # an internal RPC: a user's key is refused
        get_dispatch(dispatcher_channel, api_key, camp.id)
    assert err.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


# -- 11./12. camouflage and pacing ----------------------------------------------------------------

def test_camouflage_on_seen_typing_for_a_time_growing_with_the_text_then_send_off_only_send(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chips = [api.chip(sandbox_url, KEY) for _ in range(2)]
    cps, cap = 40.0, 1.5
    settings = res.CampaignSettings(
        pacing=res.Pacing(interval_min_seconds=0, interval_max_seconds=0),
        camouflage=res.Camouflage(send_seen=True, typing=True, typing_chars_per_second=cps, typing_max_seconds=cap))
    templates = ("Oi {{name}}", "Bom dia {{name}}, temos novidades!", "Promoção " + "muito boa " * 20 + "{{name}}")
    camp = api.campaign_with(chips, settings, templates)
    numbers = api.start_sending(camp.id, 6)
    assert api.wait_final(camp.id, timeout=60).state == COMPLETED

    pauses: list[tuple[int, float]] = []
    for p in numbers:
        reqs = [r for c in chips for r in control.requests(session=c.waha_session) if r["chat_id"] == chat_id(p)]
        reqs.sort(key=lambda r: r["ts"])
        assert [r["path"] for r in reqs] == ["/api/sendSeen", "/api/startTyping", "/api/stopTyping",
                                             "/api/sendText"], reqs
        length = len(reqs[3]["body"]["text"])
        pause = reqs[2]["ts"] - reqs[1]["ts"]
        expected = min(length / cps, cap)
        assert expected - 0.05 <= pause <= expected + 0.5, f"{length} chars typed for {pause:.2f}s"
        pauses.append((length, pause))
    pauses.sort()
    assert pauses[-1][1] > pauses[0][1] + 0.8, f"typing grows with the text: {pauses}"
    assert pauses[-1][0] / cps > cap + 1, "the longest text is bounded by typing_max_seconds"

    off = api.campaign(chips, camouflage=False)
    more = phones(4)
    api.import_phones(off.id, more)
    api.start(off.id)
    assert api.wait_final(off.id, timeout=60).state == COMPLETED
    for p in more:
        paths = [r["path"] for c in chips for r in control.requests(session=c.waha_session)
                 if r["chat_id"] == chat_id(p)]
        assert paths == ["/api/sendText"]


def test_chip_pacing_random_gaps_above_the_minimum_and_a_campaign_cannot_loosen_it(
        api: Ops, sandbox_url: str, control: SandboxControl) -> None:
    spread = api.chip(sandbox_url, KEY, interval=(0.2, 0.4))
    fixed = api.chip(sandbox_url, KEY, interval=(0.3, 0.3))
    camp = api.campaign([spread, fixed], interval=(0.0, 0.0))  # the campaign asks for no gap at all
    numbers = api.start_sending(camp.id, 30)
    assert api.wait_final(camp.id, timeout=60).state == COMPLETED

    g = gaps(control, spread)
    assert len(g) == 14 and min(g) >= 0.2 - 0.02, f"min gap {min(g):.3f}s"
    assert statistics.pstdev(g) > 0.02 and len({round(x, 2) for x in g}) > 5, f"not random: {g}"
    g = gaps(control, fixed)
    assert len(g) == 14 and min(g) >= 0.3 - 0.02, f"campaign interval 0 loosened the chip: {min(g):.3f}s"
    assert_each_once(control, (spread, fixed), numbers)
