"""Lanes end to end without the campaign service: a real arq worker process and the dispatcher
server, the WAHA sandbox, real Redis, and an in-memory DeliveryService (FakeDelivery, below) with
the semantics of campaign_service's DeliveryService: expired leases are re-leased with their
recorded WAHA id, RELEASED means "never sent" (id cleared), a restricted chip's PENDING messages
move to the other chips, the campaign completes when every message is final."""

from __future__ import annotations

import collections
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from devstack.procs import ServiceProcess
from devstack.servers import Redis, free_port
from dispatcher_service.waha.sandbox_control import SandboxControl
from tests.conftest import SANDBOX_API_KEY
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as pbg

TOKEN = "lanes-token-" + secrets.token_hex(4)
QUEUE = "whago:dispatch:lanes-" + secrets.token_hex(4)
MD = [("authorization", f"Bearer {TOKEN}")]
REDIS_SERVER: Redis | None = None

FINAL = {"SENT", "FAILED", "SKIPPED"}


@dataclass
class Msg:
    id: str
    chat_id: str
    text: str
    chip: str
    state: str = "PENDING"
    waha_id: str = ""
    lease_until: float = 0.0
    attempts: int = 0
    reason: str = ""
    history: list[str] = field(default_factory=list)


@dataclass
class Camp:
    id: str
    state: int = rpb.CAMPAIGN_STATE_RUNNING
    epoch: int = 1
    msgs: dict[str, Msg] = field(default_factory=dict)


class FakeDelivery(dgrpc.DeliveryServiceServicer):
    def __init__(self, token: str) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.camps: dict[str, Camp] = {}
        self.chip_states: dict[str, int] = {}
        self.calls: list[str] = []

    # -- test helpers ------------------------------------------------------------------------------
    def add(self, cid: str, chips: list[str], phones: list[str], epoch: int = 1) -> Camp:
        c = Camp(cid, epoch=epoch)
        for i, p in enumerate(phones):
            mid = f"{cid[:8]}-m{i:04d}"
            c.msgs[mid] = Msg(mid, f"{p}@c.us", f"hello {i}", chips[i % len(chips)])
        with self.lock:
            self.camps[cid] = c
        return c

    def set_state(self, cid: str, state: int, epoch: int | None = None) -> None:
        with self.lock:
            self.camps[cid].state = state
            if epoch is not None:
                self.camps[cid].epoch = epoch

    def counts(self, cid: str) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for m in self.camps[cid].msgs.values():
                out[m.state] = out.get(m.state, 0) + 1
            return out

    # -- RPCs --------------------------------------------------------------------------------------
    def _auth(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "service token only")

    def LeaseMessages(self, request: dpb.LeaseMessagesRequest, context: grpc.ServicerContext
                      ) -> dpb.LeaseMessagesResponse:
        self._auth(context)
        now = time.time()
        with self.lock:
            self.calls.append("lease")
            c = self.camps.get(request.campaign_id)
            if c is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no campaign")
            assert c is not None
            resp = dpb.LeaseMessagesResponse(campaign_state=c.state, epoch=c.epoch)  # type: ignore[arg-type]
            if c.state != rpb.CAMPAIGN_STATE_RUNNING or request.epoch != c.epoch:
                return resp
            for m in c.msgs.values():
                if len(resp.messages) >= request.max_messages:
                    break
                if m.chip != request.chip_id:
                    continue
                if m.state == "PENDING" or (m.state == "SENDING" and m.lease_until < now):
                    m.state = "SENDING"
                    m.lease_until = now + request.lease_seconds
                    lm = resp.messages.add(message_id=m.id, chat_id=m.chat_id, phone=m.chat_id.split("@")[0],
                                           text=m.text, waha_message_id=m.waha_id, attempts=m.attempts)
                    lm.lease_expire_time.FromNanoseconds(int(m.lease_until * 1e9))
            resp.remaining = sum(1 for m in c.msgs.values() if m.chip == request.chip_id and m.state == "PENDING")
            return resp

    def ReportDeliveries(self, request: dpb.ReportDeliveriesRequest, context: grpc.ServicerContext
                         ) -> dpb.ReportDeliveriesResponse:
        self._auth(context)
        with self.lock:
            self.calls.append("report")
            c = self.camps[request.campaign_id]
            for r in request.reports:
                m = c.msgs[r.message_id]
                name = dpb.DeliveryOutcome.Name(r.outcome)
                m.history.append(name)
                if m.state in FINAL:
                    continue
                if r.outcome == dpb.DELIVERY_OUTCOME_ATTEMPTING:
                    m.waha_id = r.waha_message_id
                    m.attempts += 1
                elif r.outcome == dpb.DELIVERY_OUTCOME_SENT:
                    m.state, m.waha_id = "SENT", r.waha_message_id or m.waha_id
                elif r.outcome in (dpb.DELIVERY_OUTCOME_FAILED, dpb.DELIVERY_OUTCOME_UNKNOWN):
                    m.state, m.reason = "FAILED", r.failure_reason
                elif r.outcome == dpb.DELIVERY_OUTCOME_SKIPPED:
                    m.state, m.reason = "SKIPPED", r.failure_reason
                elif (r.outcome == dpb.DELIVERY_OUTCOME_RELEASED and m.state == "SENDING"
                      and m.lease_until >= time.time()):
                    # as campaign_service: "never sent", so the WAHA id is cleared; ignored once expired
                    m.state, m.lease_until, m.waha_id = "PENDING", 0.0, ""
            if c.state == rpb.CAMPAIGN_STATE_RUNNING and all(m.state in FINAL for m in c.msgs.values()):
                c.state = rpb.CAMPAIGN_STATE_COMPLETED
            return dpb.ReportDeliveriesResponse(campaign_state=c.state, epoch=c.epoch)  # type: ignore[arg-type]

    def ReportChipState(self, request: dpb.ReportChipStateRequest, context: grpc.ServicerContext
                        ) -> dpb.ReportChipStateResponse:
        self._auth(context)
        resp = dpb.ReportChipStateResponse(chip=rpb.Chip(id=request.chip_id, state=request.state))
        with self.lock:
            self.calls.append(f"chip:{request.chip_id}:{rpb.ChipState.Name(request.state)}")
            self.chip_states[request.chip_id] = request.state
            if request.state != rpb.CHIP_STATE_RESTRICTED:
                return resp
            for c in self.camps.values():
                healthy = sorted({m.chip for m in c.msgs.values()} - {
                    ch for ch, st in self.chip_states.items() if st == rpb.CHIP_STATE_RESTRICTED})
                moved = [m for m in c.msgs.values() if m.chip == request.chip_id and m.state == "PENDING"]
                if not moved:
                    continue
                if not healthy:
                    c.state = rpb.CAMPAIGN_STATE_PAUSED
                    resp.paused_campaign_ids.append(c.id)
                    continue
                for i, m in enumerate(moved):
                    m.chip = healthy[i % len(healthy)]
                resp.redistributed_campaign_ids.append(c.id)
        return resp


def serve(token: str) -> tuple[grpc.Server, FakeDelivery, int]:
    fake = FakeDelivery(token)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    dgrpc.add_DeliveryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, fake, port


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@dataclass
class Rig:
    fake: FakeDelivery
    stub: pbg.DispatcherServiceStub
    control: SandboxControl
    sandbox_url: str
    env: dict[str, str]
    workdir: Path
    workers: list[ServiceProcess]

    def start_worker(self, name: str, **extra: str) -> ServiceProcess:
        p = ServiceProcess(name, "dispatcher_service.worker", [], {**self.env, **extra}, self.workdir / "logs").start()
        self.workers.append(p)
        return p

    def campaign(self, n_chips: int, n_msgs: int, interval: tuple[float, float] = (0.0, 0.0),
                 epoch: int = 1, **session_opts: object) -> tuple[str, list[str], list[str]]:
        cid = str(uuid.uuid4())
        chips = [f"chip-{cid[:6]}-{i}" for i in range(n_chips)]
        sessions = [f"sess-{cid[:6]}-{i}" for i in range(n_chips)]
        for s in sessions:
            self.control.set_session(s, status="WORKING", **session_opts)
        base = secrets.randbelow(10**6) * 1000
        phones = [f"55119{(base + i) % 10**8:08d}" for i in range(n_msgs)]
        self.fake.add(cid, chips, phones, epoch=epoch)
        req = pb.StartDispatchRequest(campaign_id=cid, epoch=epoch, camouflage=rpb.Camouflage(
            send_seen=False, typing=False))
        for chip, sess in zip(chips, sessions, strict=True):
            req.lanes.add(chip_id=chip, waha_base_url=self.sandbox_url, waha_session=sess,
                          waha_api_key=SANDBOX_API_KEY,
                          pacing=rpb.Pacing(interval_min_seconds=interval[0], interval_max_seconds=interval[1]))
        self.stub.StartDispatch(req, metadata=MD, timeout=30)
        return cid, chips, sessions

    def wait(self, pred: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                what = what() if callable(what) else what
                raise AssertionError(f"timed out waiting for {what}; workers: " +
                                     "\n".join(w.tail(30) for w in self.workers))
            time.sleep(0.1)

    def wait_state(self, cid: str, state: int, timeout: float = 60.0) -> None:
        self.wait(lambda: self.fake.camps[cid].state == state, timeout,
                  lambda: f"campaign {cid} in {rpb.CampaignState.Name(state)} ({self.fake.counts(cid)})")

    def sends_by_chat(self, sessions: list[str]) -> collections.Counter[str]:
        return collections.Counter(s["chat_id"] for ss in sessions for s in self.control.sends(session=ss))


@pytest.fixture(scope="module")
def rig(redis_server: Redis, sandbox_url: str, workdir: Path) -> Iterator[Rig]:
    global REDIS_SERVER
    REDIS_SERVER = redis_server
    server, fake, port = serve(TOKEN)
    disp_port = free_port()
    env = {
        "REDIS_URL": redis_server.url, "WHAGO_SERVICE_TOKEN": TOKEN, "CAMPAIGN_TARGET": f"127.0.0.1:{port}",
        "DISPATCHER_LISTEN": f"127.0.0.1:{disp_port}", "DISPATCH_QUEUE": QUEUE, "WAHA_TIMEOUT_SECONDS": "2",
        "DISPATCH_SLICE_SECONDS": "4", "DISPATCH_JOB_TIMEOUT": "12", "WHAGO_LOG_LEVEL": "INFO",
    }
    disp = ServiceProcess("dispatcher-lanes", "dispatcher_service.server", [], env, workdir / "logs",
                          port=disp_port).start()
    ch = grpc.insecure_channel(f"127.0.0.1:{disp_port}")
    grpc.channel_ready_future(ch).result(timeout=15)
    r = Rig(fake, pbg.DispatcherServiceStub(ch), SandboxControl(sandbox_url), sandbox_url, env, workdir, [])
    r.start_worker("worker-lanes-0")
    yield r
    for w in r.workers:
        w.stop()
    ch.close()
    disp.stop()
    server.stop(None)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_a_campaign_over_three_chips_completes_each_contact_once(rig: Rig) -> None:
    cid, _chips, sessions = rig.campaign(3, 30)
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 60)
    assert rig.fake.counts(cid) == {"SENT": 30}
    per_chat = rig.sends_by_chat(sessions)
    assert len(per_chat) == 30 and max(per_chat.values()) == 1
    assert sorted(len(rig.control.sends(session=s)) for s in sessions) == [10, 10, 10]
    # every send went out under the id recorded as ATTEMPTING before it left
    for m in rig.fake.camps[cid].msgs.values():
        assert m.history[0] == "DELIVERY_OUTCOME_ATTEMPTING" and m.history[-1] == "DELIVERY_OUTCOME_SENT"
    rig.wait(lambda: rig.stub.GetDispatch(pb.GetDispatchRequest(campaign_id=cid), metadata=MD).state
             == pb.DISPATCH_STATE_FINISHED, 15, "dispatch FINISHED")
    d = rig.stub.GetDispatch(pb.GetDispatchRequest(campaign_id=cid), metadata=MD)
    assert sum(lane.sent_count for lane in d.lanes) == 30
    assert all(lane.state == pb.LANE_STATE_FINISHED for lane in d.lanes)


def test_cancel_mid_run_at_full_speed_on_five_chips_no_request_after_it_returned(rig: Rig) -> None:
    cid, _chips, sessions = rig.campaign(5, 500, latency_ms=20)
    rig.wait(lambda: rig.fake.counts(cid).get("SENT", 0) >= 30, 60, "some sends")
    rig.fake.set_state(cid, rpb.CAMPAIGN_STATE_CANCELLED, epoch=2)
    resp = rig.stub.CancelDispatch(pb.CancelDispatchRequest(campaign_id=cid, epoch=2), metadata=MD, timeout=60)
    returned = time.time()
    time.sleep(1.5)
    after = [r for s in sessions for r in rig.control.requests(session=s, since=returned)]
    assert after == [], f"WAHA got {len(after)} requests after CancelDispatch returned"
    assert resp.revoked_jobs + resp.aborted_jobs >= 1
    assert 30 <= rig.fake.counts(cid).get("SENT", 0) < 500
    per_chat = rig.sends_by_chat(sessions)
    assert max(per_chat.values()) == 1


def test_pause_then_resume_sends_only_the_rest(rig: Rig) -> None:
    cid, chips, sessions = rig.campaign(2, 120, interval=(0.01, 0.03))
    rig.wait(lambda: rig.fake.counts(cid).get("SENT", 0) >= 20, 60, "some sends")
    rig.fake.set_state(cid, rpb.CAMPAIGN_STATE_PAUSED, epoch=2)
    rig.stub.PauseDispatch(pb.PauseDispatchRequest(campaign_id=cid, epoch=2), metadata=MD, timeout=60)
    returned = time.time()
    time.sleep(1.0)
    assert [r for s in sessions for r in rig.control.requests(session=s, since=returned)] == []
    rig.wait(lambda: rig.fake.counts(cid).get("SENDING", 0) == 0, 20, "leases released")

    rig.fake.set_state(cid, rpb.CAMPAIGN_STATE_RUNNING, epoch=3)
    req = pb.StartDispatchRequest(campaign_id=cid, epoch=3, camouflage=rpb.Camouflage(send_seen=False, typing=False))
    for chip, sess in zip(chips, sessions, strict=True):
        req.lanes.add(chip_id=chip, waha_base_url=rig.sandbox_url, waha_session=sess, waha_api_key=SANDBOX_API_KEY,
                      pacing=rpb.Pacing(interval_min_seconds=0.01, interval_max_seconds=0.03))
    rig.stub.StartDispatch(req, metadata=MD, timeout=30)
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 90)
    per_chat = rig.sends_by_chat(sessions)
    assert len(per_chat) == 120 and max(per_chat.values()) == 1


def test_restricted_chip_leaves_rotation_and_its_messages_go_to_the_others(rig: Rig) -> None:
    cid, chips, sessions = rig.campaign(3, 45, interval=(0.01, 0.02))
    rig.control.set_session(sessions[0], fail_next=[{"status": 500, "error": 463, "count": 1000}])
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 90)
    assert rig.fake.counts(cid) == {"SENT": 45}
    assert rig.fake.chip_states[chips[0]] == rpb.CHIP_STATE_RESTRICTED
    assert rig.control.sends(session=sessions[0]) == []
    per_chat = rig.sends_by_chat(sessions)
    assert len(per_chat) == 45 and max(per_chat.values()) == 1
    d = rig.stub.GetDispatch(pb.GetDispatchRequest(campaign_id=cid), metadata=MD)
    lane0 = next(lane for lane in d.lanes if lane.chip_id == chips[0])
    assert lane0.state == pb.LANE_STATE_FAILED and "463" in lane0.last_error


def test_session_not_working_backs_off_and_resumes(rig: Rig) -> None:
    cid, chips, sessions = rig.campaign(1, 10, interval=(0.01, 0.02))
    rig.control.set_session(sessions[0], status="STARTING")
    rig.wait(lambda: rig.fake.chip_states.get(chips[0]) == rpb.CHIP_STATE_UNAVAILABLE, 30, "chip UNAVAILABLE")
    d = rig.stub.GetDispatch(pb.GetDispatchRequest(campaign_id=cid), metadata=MD)
    assert d.lanes[0].state == pb.LANE_STATE_BACKING_OFF
    assert rig.fake.counts(cid).get("SENT", 0) == 0 and rig.fake.counts(cid).get("SENDING", 0) == 0
    rig.control.set_session(sessions[0], status="WORKING")
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 60)
    assert rig.fake.chip_states[chips[0]] == rpb.CHIP_STATE_ACTIVE
    assert len(rig.control.sends(session=sessions[0])) == 10


def test_a_timed_out_send_that_reached_waha_is_found_not_resent(rig: Rig) -> None:
    cid, _chips, sessions = rig.campaign(1, 6, interval=(0.01, 0.02))
    rig.control.set_session(sessions[0], timeout_next=2)
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 60)
    assert rig.fake.counts(cid) == {"SENT": 6}
    delivered = collections.Counter(m["chatId"] for m in rig.control.messages(session=sessions[0]))
    assert len(delivered) == 6 and max(delivered.values()) == 1
    sends = rig.control.requests(session=sessions[0], path="/api/sendText")
    assert not any(r["duplicate"] for r in sends), "no resend of a message WAHA already had"
    looked_up = rig.control.requests(session=sessions[0], path="/messages/")
    assert looked_up, "the uncertain sends were checked with GET .../messages/{id}"


def test_worker_killed_mid_campaign_nothing_lost_nothing_twice(rig: Rig) -> None:
    cid, _chips, sessions = rig.campaign(3, 90, interval=(0.05, 0.1))
    rig.wait(lambda: rig.fake.counts(cid).get("SENT", 0) >= 10, 60, "some sends")
    for w in list(rig.workers):  # every worker dies mid-slice: SIGKILL, no cleanup at all
        w.kill()
        rig.workers.remove(w)
    killed_at = rig.fake.counts(cid)
    assert killed_at.get("SENT", 0) < 90
    rig.start_worker("worker-lanes-replacement")
    # arq re-runs the dead jobs once their in-progress keys expire (job timeout + 10 s); leases
    # expire before that, so the re-runs find the messages again.
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 120)
    assert rig.fake.counts(cid) == {"SENT": 90}
    delivered = collections.Counter(m["chatId"] for s in sessions for m in rig.control.messages(session=s))
    assert len(delivered) == 90 and max(delivered.values()) == 1


def test_redis_restart_mid_campaign_worker_reconnects_and_completes(rig: Rig) -> None:
    assert REDIS_SERVER is not None
    cid, _chips, sessions = rig.campaign(2, 80, interval=(0.05, 0.1))
    rig.wait(lambda: rig.fake.counts(cid).get("SENT", 0) >= 10, 60, "some sends")
    REDIS_SERVER.restart()  # data kept (append-only file)
    rig.wait_state(cid, rpb.CAMPAIGN_STATE_COMPLETED, 120)
    assert rig.fake.counts(cid) == {"SENT": 80}
    delivered = collections.Counter(m["chatId"] for s in sessions for m in rig.control.messages(session=s))
    assert len(delivered) == 80 and max(delivered.values()) == 1
    assert all(w.alive() for w in rig.workers)
