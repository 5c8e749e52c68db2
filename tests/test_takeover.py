"""Crash recovery in seconds (issue 16, dispatcher_service/takeover.py): a lane whose owner stops
beating is taken over by another worker well before arq's job timeout, and the old owner, should
it come back, is fenced out. Real processes and real signals (SIGKILL, SIGSTOP/SIGCONT)."""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import Ops, chat_id, logged_port, scrape, value, wait_for
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import resources_pb2 as res

TARGET_SECONDS = 15.0
COMPLETED, SENT = res.CAMPAIGN_STATE_COMPLETED, res.MESSAGE_STATE_SENT
# arq would re-run a dead worker's job only after DISPATCH_JOB_TIMEOUT + 10 s = 70 s: anything
# sooner is the takeover. Slices of 10 s keep a lane on the worker that started it.
STACK_ENV = {"DISPATCH_JOB_TIMEOUT": "60", "DISPATCH_SLICE_SECONDS": "10"}


@pytest.fixture(scope="module")
def tk_stack(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    with isolated_stack("takeover", workers=0, **STACK_ENV) as st:
        yield st


@pytest.fixture()
def tk(tk_stack: IsolatedStack) -> Iterator[IsolatedStack]:
    """The dedicated stack with no worker left over from an earlier test."""
    for w in tk_stack.workers:
        w.signal(signal.SIGCONT)
    tk_stack.kill_workers()
    yield tk_stack


def resumed_after(control: SandboxControl, chips: list[res.Chip], t0: float, settle: float = 0.5) -> list[float]:
    """Per chip, seconds from t0 to its first send that arrived after t0 + settle (a request that
    had already left when the owner died may land just after), or inf."""
    out = []
    for c in chips:
        later = [s["ts"] for s in control.sends(session=c.waha_session, since=t0 + settle)]
        out.append(min(later) - t0 if later else float("inf"))
    return out


def assert_each_once(control: SandboxControl, chips: list[res.Chip], numbers: list[str]) -> None:
    got = collections.Counter(s["chat_id"] for c in chips for s in control.sends(session=c.waha_session))
    assert set(got) == {chat_id(p) for p in numbers}, "a contact got nothing, or a stranger got a message"
    assert not {k: v for k, v in got.items() if v > 1}, "a contact got a message twice"


def start_on_one_worker(tk: IsolatedStack, ops: Ops, sandbox_url: str, n: int
                        ) -> tuple[ServiceProcess, list[res.Chip], res.Campaign, list[str]]:
    """A 2-chip campaign running on worker A only; worker B started next to it (idle, its metrics
    on a port of its own)."""
    a = tk.start_worker(f"takeover-a-{time.monotonic_ns()}")
    chips = [ops.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.1, 0.15)) for _ in range(2)]
    camp = ops.campaign(chips)
    numbers = ops.start_sending(camp.id, n, sent_at_least=10, timeout=60)
    tk.start_worker(f"takeover-b-{time.monotonic_ns()}", WORKER_METRICS_LISTEN="127.0.0.1:0")
    return a, chips, camp, numbers


def finish_and_check(ops: Ops, control: SandboxControl, chips: list[res.Chip], camp: res.Campaign,
                     numbers: list[str], tk: IsolatedStack) -> res.Campaign:
    try:
        done = ops.wait_final(camp.id, timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n" + "\n".join(f"--- {w.name}\n{w.tail(30)}" for w in tk.workers)) from None
    n = len(numbers)
    assert done.state == COMPLETED and done.sent_count == n and done.failed_count == 0
    assert collections.Counter(m.state for m in ops.messages(camp.id)) == {SENT: n}
    assert_each_once(control, chips, numbers)
    return done


def leases_written_ahead(tk: IsolatedStack, camp: res.Campaign, chips: list[res.Chip]) -> float:
    """The latest end of the leases the lanes' owner holds (`lease_until`, written before each lease)."""
    r = redis.Redis.from_url(tk.redis.url)
    try:
        return max(float(r.hget(f"whago:lane:{camp.id}:{c.id}", "lease_until") or 0) for c in chips)
    finally:
        r.close()


def test_sigkilled_owner_its_lanes_send_again_from_another_worker_within_15s_each_contact_once(
        tk: IsolatedStack, api_key: str, sandbox_url: str, control: SandboxControl) -> None:
    ops = Ops(tk.campaign_channel, api_key)
    a, chips, camp, numbers = start_on_one_worker(tk, ops, sandbox_url, 160)
    a.signal(signal.SIGSTOP)  # what it holds now is what it dies with
    leases_end = leases_written_ahead(tk, camp, chips)
    held = {m.chat_id for m in ops.messages(camp.id) if m.state == res.MESSAGE_STATE_SENDING}
    t_kill = time.time()
    a.kill()
    tk.workers.remove(a)
    assert ops.get(camp.id).sent_count < 160
    wait_for(lambda: max(resumed_after(control, chips, t_kill)) < float("inf"), timeout=TARGET_SECONDS + 5,
             what="every lane sending again after the kill")
    took = resumed_after(control, chips, t_kill)
    assert max(took) < TARGET_SECONDS, f"lanes resumed {took} s after the SIGKILL"
    [b] = tk.workers
    assert value(scrape(logged_port(b)), "whago_lane_takeovers_total") >= len(chips)
    finish_and_check(ops, control, chips, camp, numbers, tk)
    # The dead owner's leased messages were retaken once it was fenced (plus a WAHA timeout), not
    # when their leases ended (reclaim_owners).
    assert held, "the dead owner held no leased message: the scenario did not test the reclaim"
    last = max(s["ts"] for c in chips for s in control.sends(session=c.waha_session) if s["chat_id"] in held)
    assert last < leases_end - 1.0, f"held messages sent {last - t_kill:.1f} s after the kill, leases ended at " \
        f"{leases_end - t_kill:.1f} s"


def test_sigstopped_owner_taken_over_then_sigconted_sends_nothing_more(
        tk: IsolatedStack, api_key: str, sandbox_url: str, control: SandboxControl) -> None:
    ops = Ops(tk.campaign_channel, api_key)
    a, chips, camp, numbers = start_on_one_worker(tk, ops, sandbox_url, 160)
    t_stop = time.time()
    a.signal(signal.SIGSTOP)  # a long GC pause or a partition: the owner is alive but silent
    try:
        # What the stopped owner holds (it can lease no more): leased, not sent before it stopped.
        held = {m.chat_id for m in ops.messages(camp.id) if m.state == res.MESSAGE_STATE_SENDING}
        wait_for(lambda: max(resumed_after(control, chips, t_stop)) < float("inf"), timeout=TARGET_SECONDS + 5,
                 what="every lane taken over while its owner is stopped")
        took = resumed_after(control, chips, t_stop)
        assert max(took) < TARGET_SECONDS, f"lanes resumed {took} s after the SIGSTOP"
        sent_before = {s["chat_id"] for c in chips for s in control.sends(session=c.waha_session)
                       if s["ts"] < t_stop + 0.5}
    finally:
        a.signal(signal.SIGCONT)
    t_cont = time.time()
    a.wait_logged("lane lock lost", timeout=20)
    time.sleep(2.0)  # an unfenced owner would send its leased messages right away
    after = {s["chat_id"] for c in chips for s in control.sends(session=c.waha_session, since=t_cont)}
    stale = held - sent_before
    assert stale, "the stopped owner held no leased message: the scenario did not test the fence"
    assert not (after & stale), "the stale owner sent after it came back"
    finish_and_check(ops, control, chips, camp, numbers, tk)
