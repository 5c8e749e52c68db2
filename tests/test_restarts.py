"""Issue 16, "every part killed and restarted mid-campaign": real processes and real signals under a
running multi-chip campaign. For each scenario the campaign ends (COMPLETED, or CANCELLED when the
test cancels it), every contact got exactly one message or its row records why not, the campaign's
counters match its rows, and nothing stays SENDING.

Each scenario runs on a dedicated stack (`isolated_stack`: its own Redis, campaign server,
dispatcher server and two workers; the PostgreSQL scenario also gets its own PostgreSQL cluster, so
stopping it leaves the session's database alone). The watchdog's stall time is short
(WHAGO_WATCHDOG_STALL_SECONDS) so a dispatch whose Redis state was lost is restarted in seconds.
tests/test_guarantees.py covers a worker SIGKILL and a Redis restart with data kept;
tests/test_campaign_dispatcher_down.py a dispatcher that is down before the call.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from unittest import mock

import grpc
import pytest

from campaign_service import admin
from devstack.procs import REPO, service_env
from devstack.servers import Postgres, free_port
from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import Ops, chat_id, wait_for
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

SENT, FAILED, SENDING = res.MESSAGE_STATE_SENT, res.MESSAGE_STATE_FAILED, res.MESSAGE_STATE_SENDING
COMPLETED, CANCELLED, RUNNING = (res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED,
                                 res.CAMPAIGN_STATE_RUNNING)
# Short enough that a dispatch that lost its Redis state is restarted within the test's budget,
# long enough that a lane between two leases is never taken for a stalled one.
STALL_ENV = {"WHAGO_WATCHDOG_STALL_SECONDS": "5"}
CHIP_GAP = (0.1, 0.2)  # paced sends: a 45-contact campaign on 3 chips lasts a few seconds


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rstack(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    with isolated_stack("restarts", workers=2, **STALL_ENV) as st:
        yield st


@pytest.fixture()
def iso(rstack: IsolatedStack) -> Iterator[IsolatedStack]:
    """The dedicated stack with its processes up (a failed test may have left one down)."""
    for p in (rstack.campaign, rstack.dispatcher):
        if not p.alive():
            p.start()
    if rstack.redis.proc is None:
        rstack.redis.start()
    rstack.workers[:] = [w for w in rstack.workers if w.alive()]
    while len(rstack.workers) < 2:
        rstack.start_worker()
    yield rstack


@pytest.fixture()
def ops(iso: IsolatedStack, api_key: str) -> Ops:
    return Ops(iso.campaign_channel, api_key)


@pytest.fixture(scope="module")
def own_postgres(workdir: Path) -> Iterator[Postgres]:
    """A PostgreSQL cluster of this module's own, migrated: the outage test stops it."""
    pg = Postgres(workdir / "pg-restarts", free_port())
    pg.start(fast_unsafe=True)
    pg.create_database("whago")
    subprocess.run([sys.executable, "-m", "campaign_service.admin", "migrate"],
                   env=service_env({"DATABASE_URL": pg.url("whago")}), cwd=REPO, check=True)
    yield pg
    pg.stop_fast()


@pytest.fixture(scope="module")
def pg_stack(isolated_stack: Callable[..., IsolatedStack], own_postgres: Postgres) -> Iterator[IsolatedStack]:
    with isolated_stack("restarts-pg", workers=2, DATABASE_URL=own_postgres.url("whago"), **STALL_ENV) as st:
        yield st


def new_user(database_url: str) -> str:
    """A user with credits in that database (the admin CLI's entry point, in this process)."""
    buf = io.StringIO()
    argv = ["create-user", "--name", f"restarts-{os.urandom(4).hex()}", "--credits", "100000"]
    with mock.patch.dict(os.environ, {"DATABASE_URL": database_url}), contextlib.redirect_stdout(buf):
        assert admin.main(argv) == 0, buf.getvalue()
    return buf.getvalue().strip().splitlines()[-1]


# -- what every scenario checks -------------------------------------------------------------------


def delivered_by_chat(control: SandboxControl, chips: Iterable[res.Chip]) -> collections.Counter[str]:
    """Messages the sandbox holds (unique by WAHA id), per chat id: what WhatsApp received."""
    return collections.Counter(m["chatId"] for c in chips for m in control.messages(session=c.waha_session))


def assert_accounted(ops: Ops, control: SandboxControl, chips: list[res.Chip], campaign_id: str,
                     numbers: list[str], state: int = COMPLETED) -> res.Campaign:
    """The campaign ended in `state`; each contact has one row, SENT rows reached WhatsApp exactly
    once, FAILED rows carry a reason and did not reach it (unless the reason is OUTCOME_UNKNOWN:
    then at most once), nobody else was messaged, and the counters are the rows'."""
    final = ops.get(campaign_id)
    assert final.state == state, final
    msgs = ops.messages(campaign_id)
    rows = {m.chat_id: m for m in msgs}
    assert len(msgs) == len(numbers) and set(rows) == {chat_id(p) for p in numbers}
    by_state = collections.Counter(m.state for m in msgs)
    assert set(by_state) <= {SENT, FAILED}, f"rows not final: {by_state}"
    assert all(m.failure_reason for m in msgs if m.state == FAILED), "a FAILED row without its reason"
    assert (final.sent_count, final.failed_count, final.pending_count) == (by_state[SENT], by_state[FAILED], 0)
    got = delivered_by_chat(control, chips)
    twice = {k: v for k, v in got.items() if v > 1}
    assert not twice, f"contacts messaged more than once: {twice}"
    assert set(got) <= set(rows), f"messaged but not a contact: {set(got) - set(rows)}"
    missing = [c for c, m in rows.items() if m.state == SENT and c not in got]
    assert not missing, f"SENT but never reached WhatsApp: {missing}"
    wrong = {c: (m.id, m.failure_reason) for c, m in rows.items()
             if m.state == FAILED and c in got and "OUTCOME_UNKNOWN" not in m.failure_reason}
    assert not wrong, f"reached WhatsApp but recorded FAILED (counts off): {wrong}"
    reasons = collections.Counter(m.failure_reason for m in msgs if m.state == FAILED)
    print(f"campaign {campaign_id}: {res.CampaignState.Name(final.state)} sent={final.sent_count} "
          f"failed={final.failed_count} reasons={dict(reasons)} delivered={sum(got.values())}")
    return final


def start_campaign(ops: Ops, sandbox_url: str, chips: int = 3, contacts: int = 45,
                   sent_at_least: int = 8) -> tuple[list[res.Chip], res.Campaign, list[str]]:
    """A running campaign over `chips` paced chips, once `sent_at_least` messages went out."""
    cs_ = [ops.chip(sandbox_url, SANDBOX_API_KEY, interval=CHIP_GAP) for _ in range(chips)]
    camp = ops.campaign(cs_)
    numbers = ops.start_sending(camp.id, contacts, sent_at_least=sent_at_least, timeout=30)
    return cs_, camp, numbers


def logs(stack: IsolatedStack) -> str:
    procs = [stack.campaign, stack.dispatcher, *stack.workers]
    return "\n".join(f"--- {p.name}\n{p.tail(20)}" for p in procs)


def wait_final(ops: Ops, stack: IsolatedStack, campaign_id: str, timeout: float = 40) -> res.Campaign:
    try:
        return ops.wait_final(campaign_id, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{logs(stack)}") from None


# -- PostgreSQL -------------------------------------------------------------------------------------


def test_postgres_down_10s_mid_campaign_unavailable_meanwhile_reports_retried_nothing_lost(
        pg_stack: IsolatedStack, own_postgres: Postgres, sandbox_url: str, control: SandboxControl) -> None:
    ops = Ops(pg_stack.campaign_channel, new_user(own_postgres.url("whago")))
    chips, camp, numbers = start_campaign(ops, sandbox_url, contacts=60)

    at_stop = sum(delivered_by_chat(control, chips).values())
    own_postgres.stop_fast()
    down_at = time.monotonic()
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    try:
        while time.monotonic() - down_at < 10:  # the outage lasts 10 s; ask all along
            try:
                ops.campaigns.GetCampaign(cs.GetCampaignRequest(campaign_id=camp.id), metadata=tuple(ops.md), timeout=5)
                codes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as e:
                codes[e.code()] += 1
            time.sleep(0.5)
    finally:
        own_postgres.start(fast_unsafe=True)

    assert codes[grpc.StatusCode.UNAVAILABLE] > 0 and set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
    done = wait_final(ops, pg_stack, camp.id)
    final = assert_accounted(ops, control, chips, camp.id, numbers)
    assert done.sent_count == 60 and final.failed_count == 0, final
    assert at_stop < 60, "the campaign was still running when PostgreSQL went down"


# -- Redis ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("persist", [True, False], ids=["appendonly", "no-persistence"])
def test_redis_restarted_mid_campaign_completes_each_contact_once(
        iso: IsolatedStack, ops: Ops, sandbox_url: str, control: SandboxControl, persist: bool) -> None:
    """With persistence the queue and fences come back; without, they are gone: lanes find no run
    fence and stop, and campaign_service's watchdog starts the dispatch again (new epoch)."""
    chips, camp, numbers = start_campaign(ops, sandbox_url)

    iso.redis.persist = persist
    try:
        iso.redis.restart()
    finally:
        iso.redis.persist = True

    wait_final(ops, iso, camp.id)
    final = assert_accounted(ops, control, chips, camp.id, numbers)
    assert final.sent_count == 45 and final.failed_count == 0, final
    assert all(w.alive() for w in iso.workers), "the workers survived the restart"


# -- campaign_service -------------------------------------------------------------------------------


def test_campaign_service_sigkilled_and_restarted_mid_campaign_reports_wait_and_arrive(
        iso: IsolatedStack, ops: Ops, sandbox_url: str, control: SandboxControl) -> None:
    chips, camp, numbers = start_campaign(ops, sandbox_url)

    iso.campaign.kill()
    # Sends already leased go on; their reports wait for the service (wait_for_ready, retries).
    wait_for(lambda: sum(delivered_by_chat(control, chips).values()) >= 12, 20, "sends while it is down")
    iso.campaign.start()

    wait_final(ops, iso, camp.id)
    final = assert_accounted(ops, control, chips, camp.id, numbers)
    assert final.sent_count == 45 and final.failed_count == 0, final


# -- dispatcher API -------------------------------------------------------------------------------


def test_dispatcher_sigkilled_while_a_cancel_is_in_flight_cancel_fails_cleanly_then_confirms(
        iso: IsolatedStack, ops: Ops, sandbox_url: str, control: SandboxControl) -> None:
    """A Cancel waits for the sends in flight (1.5 s each here); the dispatcher dies meanwhile. The
    Cancel answers UNAVAILABLE with the campaign unchanged, or confirms; a retry confirms; no WAHA
    request for the campaign arrives after a confirmed Cancel."""
    chips = [ops.chip(sandbox_url, SANDBOX_API_KEY) for _ in range(3)]
    sessions = {c.waha_session for c in chips}
    for s in sessions:
        control.set_session(s, latency_ms=1500)
    camp = ops.campaign(chips)
    numbers = ops.start_sending(camp.id, 30, sent_at_least=3, timeout=30)
    wait_for(lambda: any(r["ts_done"] is None for s in sessions
                         for r in control.requests(session=s, path="/api/sendText")), 10, "a send in flight")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ops.cancel, camp.id)
        # The stop fence is the dispatcher's first step of CancelDispatch: it is in flight from then.
        wait_for(lambda: fut.done() or "stop:" in (iso_fence(iso, camp.id) or ""), 10, "CancelDispatch reached")
        iso.dispatcher.kill()
        try:
            first: res.Campaign | None = fut.result(timeout=30)
            err = None
        except grpc.RpcError as e:
            first, err = None, e
    iso.dispatcher.start()

    if first is None:
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert ops.get(camp.id).state == RUNNING, "a failed Cancel changes nothing"
        # Retried as a client does on UNAVAILABLE: campaign_service's channel to the restarted
        # dispatcher may still be in its reconnect backoff (up to 2 s) for the first retry.
        retried: list[res.Campaign] = []
        wait_for(lambda: _cancel_unless_unavailable(ops, camp.id, retried), 15, "a retried Cancel confirming")
        confirmed = retried[0]
    else:
        confirmed = first
    returned = time.time()
    assert confirmed.state == CANCELLED

    wait_for(lambda: SENDING not in {m.state for m in ops.messages(camp.id)}, 20, "no row left SENDING")
    late = [r for r in control.requests(since=returned) if r.get("session") in sessions]
    assert late == [], f"WAHA got {len(late)} requests after the confirmed Cancel: {late[:3]}"
    # The sends in flight at the Cancel reach WAHA; their SENT reports may land just after it
    # (the truth wins over "cancelled by user"): wait until the rows and counters show them.
    wait_for(lambda: settled(ops, control, chips, camp.id), 20, "the in-flight sends' SENT reports")
    final = assert_accounted(ops, control, chips, camp.id, numbers, state=CANCELLED)
    assert final.sent_count < 30
    assert {m.failure_reason for m in ops.messages(camp.id) if m.state == FAILED} <= {"cancelled by user"}


def _cancel_unless_unavailable(ops: Ops, campaign_id: str, out: list[res.Campaign]) -> bool:
    """One CancelCampaign: True with its answer in `out`; False on UNAVAILABLE (retry); else raise."""
    try:
        out.append(ops.cancel(campaign_id))
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        assert ops.get(campaign_id).state == RUNNING, "a failed Cancel changes nothing"
        return False
    return True


def settled(ops: Ops, control: SandboxControl, chips: list[res.Chip], campaign_id: str) -> bool:
    """Rows SENT exactly for the contacts WhatsApp received, and the counters equal to the rows."""
    c, msgs = ops.get(campaign_id), ops.messages(campaign_id)
    sent = {m.chat_id for m in msgs if m.state == SENT}
    return sent == set(delivered_by_chat(control, chips)) and c.sent_count == len(sent) \
        and c.failed_count == sum(m.state == FAILED for m in msgs)


def iso_fence(stack: IsolatedStack, campaign_id: str) -> str | None:
    """The dispatcher's stop fence of a campaign in the stack's Redis (run:N or stop:N)."""
    import redis

    with redis.Redis.from_url(stack.redis.url, socket_timeout=2) as r:
        v = r.get(f"whago:fence:{campaign_id}")
    return v.decode() if v is not None else None


# -- WAHA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["hang", "reset"])
def test_waha_hanging_or_resetting_connections_each_contact_once_or_a_recorded_reason(
        iso: IsolatedStack, ops: Ops, sandbox_url: str, control: SandboxControl, fault: str) -> None:
    """One chip's WAHA stops answering: every request (sends, the lookups of uncertain sends,
    session checks) hangs past WAHA_TIMEOUT_SECONDS (2 s) or has its connection reset, half of the
    sends after creating the message. Then it recovers. Uncertain sends are looked up, never resent
    blindly; the rest of the campaign goes on."""
    chips = [ops.chip(sandbox_url, SANDBOX_API_KEY, interval=CHIP_GAP) for _ in range(3)]
    bad = chips[0].waha_session
    kind = {"timeout": True} if fault == "hang" else {"reset": True}
    control.set_session(bad, fail_next=[{**kind, "path": "/api/", "deliver": True, "count": 2},
                                        {**kind, "path": "/api/", "deliver": False, "count": 2}])
    camp = ops.campaign(chips)
    numbers = ops.start_sending(camp.id, 30)

    wait_final(ops, iso, camp.id, timeout=60)
    final = assert_accounted(ops, control, chips, camp.id, numbers)
    faulted = [r for r in control.requests(session=bad) if r.get("fault")]
    assert len(faulted) == 4, faulted
    assert final.sent_count + final.failed_count == 30
    rows = {m.chat_id: m for m in ops.messages(camp.id)}
    for m in rows.values():
        if m.state == FAILED:
            assert "OUTCOME_UNKNOWN" in m.failure_reason or "WAHA" in m.failure_reason, m
