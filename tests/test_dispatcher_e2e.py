"""Dispatcher guarantees through the whole real stack: campaign_service on PostgreSQL, the
dispatcher server and arq workers on Redis, the WAHA sandbox."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable

from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import Api, phones
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import resources_pb2 as res


def test_cancel_mid_run_at_full_speed_on_five_chips_no_request_after_cancel_returned(
        api: Api, sandbox_url: str, control: SandboxControl) -> None:
    chips = [api.chip(sandbox_url, SANDBOX_API_KEY) for _ in range(5)]
    sessions = {c.waha_session for c in chips}
    for s in sessions:  # a little latency so the run lasts long enough to be cancelled mid-way
        control.set_session(s, latency_ms=15)
    camp = api.campaign(chips)  # interval 0, no camouflage: full speed
    api.import_phones(camp.id, phones(1500))
    api.start(camp.id)
    api.wait(camp.id, lambda c: c.sent_count >= 50, timeout=60)

    cancelled = api.cancel(camp.id)
    returned = time.time()

    assert cancelled.state == res.CAMPAIGN_STATE_CANCELLED
    time.sleep(2.0)
    after = [r for r in control.requests(since=returned) if r.get("session") in sessions]
    assert after == [], f"WAHA got {len(after)} requests after CancelCampaign returned: {after[:3]}"
    final = api.get(camp.id)
    assert 50 <= final.sent_count < 1500
    sends = [s for c in chips for s in control.sends(session=c.waha_session)]
    per_chat = collections.Counter(s["chat_id"] for s in sends)
    assert max(per_chat.values()) == 1
    assert len(sends) == final.sent_count


def test_two_workers_two_campaigns_sharing_a_chip_respect_its_minimum_gap(
        api: Api, sandbox_url: str, control: SandboxControl,
        start_worker: Callable[..., ServiceProcess]) -> None:
    w = start_worker("worker-shared-chip")
    w.wait_logged(" started: ", timeout=30)  # both workers polling first
    shared = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.4, 0.6))
    own = [api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.4, 0.6)) for _ in range(2)]
    camps = [api.campaign([shared, own[i]], interval=(0.0, 0.0)) for i in range(2)]
    for c in camps:
        api.import_phones(c.id, phones(16))
    for c in camps:
        api.start(c.id)
    for c in camps:
        assert api.wait_final(c.id, timeout=120).state == res.CAMPAIGN_STATE_COMPLETED

    for chip in (shared, *own):
        times = sorted(s["ts"] for s in control.sends(session=chip.waha_session))
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps and min(gaps) >= 0.4 - 0.02, f"{chip.waha_session}: min gap {min(gaps):.3f}s"
    sends = [s for chip in (shared, *own) for s in control.sends(session=chip.waha_session)]
    per_chat = collections.Counter(s["chat_id"] for s in sends)
    assert len(per_chat) == 32 and max(per_chat.values()) == 1
    shared_sends = control.sends(session=shared.waha_session)
    assert len(shared_sends) == 16  # 8 of each campaign, round-robin
    # Stopped while campaign_service is up: stopped at the session's end, after it, its lanes' last
    # reports waited for the service until the 20 s SIGKILL.
    assert w.stop() == 0
