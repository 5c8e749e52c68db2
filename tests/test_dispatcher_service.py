"""DispatcherService over real gRPC on loopback, with a real Redis (no worker: jobs stay queued)."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis as redis_sync
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError

from devstack.procs import ServiceProcess
from devstack.servers import Redis, free_port
from dispatcher_service import errors
from dispatcher_service.errors import to_service_error
from dispatcher_service.fences import StaleEpoch
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as pbg

TOKEN = "disp-test-token-" + secrets.token_hex(4)
QUEUE = "whago:dispatch:test-" + secrets.token_hex(4)
MD = [("authorization", f"Bearer {TOKEN}")]


def _server(name: str, redis_url: str, workdir: Path) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(name, "dispatcher_service.server", [], {
        "REDIS_URL": redis_url, "WHAGO_SERVICE_TOKEN": TOKEN, "DISPATCHER_LISTEN": f"127.0.0.1:{port}",
        "DISPATCH_QUEUE": QUEUE, "WAHA_TIMEOUT_SECONDS": "2", "WHAGO_LOG_LEVEL": "INFO",
    }, workdir / "logs", port=port).start()


@pytest.fixture(scope="module")
def disp_server(redis_server: Redis, workdir: Path) -> Iterator[ServiceProcess]:
    p = _server("dispatcher-unit", redis_server.url, workdir)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def stub(disp_server: ServiceProcess) -> Iterator[pbg.DispatcherServiceStub]:
    ch = grpc.insecure_channel(f"127.0.0.1:{disp_server.port}")
    grpc.channel_ready_future(ch).result(timeout=15)
    yield pbg.DispatcherServiceStub(ch)
    ch.close()


@pytest.fixture(scope="module")
def rds(redis_server: Redis) -> Iterator[redis_sync.Redis]:
    r = redis_sync.Redis.from_url(redis_server.url)
    yield r
    r.close()


def start_req(campaign: str, epoch: int = 1, chips: int = 3, **pacing: float) -> pb.StartDispatchRequest:
    return pb.StartDispatchRequest(campaign_id=campaign, epoch=epoch, lanes=[
        pb.LaneSpec(chip_id=f"chip-{i}", waha_base_url="http://127.0.0.1:9", waha_session=f"s{i}",
                    waha_api_key="k", pacing=rpb.Pacing(**pacing))  # type: ignore[arg-type]
        for i in range(chips)], camouflage=rpb.Camouflage(send_seen=False, typing=False))


def queued(rds: redis_sync.Redis, campaign: str) -> list[str]:
    return sorted(j.decode() for j in rds.zrange(QUEUE, 0, -1) if f":{campaign}:" in j.decode())


def field_violations(e: grpc.RpcError) -> dict[str, str]:
    st = rpc_status.from_call(e)  # type: ignore[arg-type]
    assert st is not None
    out: dict[str, str] = {}
    for d in st.details:
        br = error_details_pb2.BadRequest()
        if d.Unpack(br):
            out.update({v.field: v.description for v in br.field_violations})
    return out


def new_campaign() -> str:
    return str(uuid.uuid4())


def test_auth_is_required_and_only_the_service_token_passes(stub: pbg.DispatcherServiceStub) -> None:
    req = pb.GetDispatchRequest(campaign_id=new_campaign())
    with pytest.raises(grpc.RpcError) as e:
        stub.GetDispatch(req)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.GetDispatch(req, metadata=[("authorization", "Bearer some-user-api-key")])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        stub.GetDispatch(req, metadata=MD)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_start_enqueues_one_arq_job_per_lane_and_is_idempotent(
        stub: pbg.DispatcherServiceStub, rds: redis_sync.Redis) -> None:
    c = new_campaign()
    resp = stub.StartDispatch(start_req(c, epoch=1), metadata=MD)
    assert resp.dispatch.state == pb.DISPATCH_STATE_RUNNING and resp.dispatch.epoch == 1
    assert [lane.chip_id for lane in resp.dispatch.lanes] == ["chip-0", "chip-1", "chip-2"]
    assert all(lane.state == pb.LANE_STATE_QUEUED for lane in resp.dispatch.lanes)
    jobs = queued(rds, c)
    assert jobs == [f"lane:{c}:chip-{i}:1:1" for i in range(3)]
    assert all(rds.exists(f"arq:job:{j}") for j in jobs)
    assert rds.get(f"whago:fence:{c}") == b"run:1"

    again = stub.StartDispatch(start_req(c, epoch=1), metadata=MD)
    assert again.dispatch.epoch == 1
    assert queued(rds, c) == jobs  # same epoch: no new jobs

    got = stub.GetDispatch(pb.GetDispatchRequest(campaign_id=c), metadata=MD)
    assert got.state == pb.DISPATCH_STATE_RUNNING and len(got.lanes) == 3


def test_a_lower_epoch_is_failed_precondition(stub: pbg.DispatcherServiceStub) -> None:
    c = new_campaign()
    stub.StartDispatch(start_req(c, epoch=5), metadata=MD)
    with pytest.raises(grpc.RpcError) as e:
        stub.StartDispatch(start_req(c, epoch=4), metadata=MD)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.PauseDispatch(pb.PauseDispatchRequest(campaign_id=c, epoch=6), metadata=MD)
    with pytest.raises(grpc.RpcError) as e:  # a paused epoch never runs again
        stub.StartDispatch(start_req(c, epoch=6), metadata=MD)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_pause_revokes_queued_jobs_and_resume_uses_new_job_ids(
        stub: pbg.DispatcherServiceStub, rds: redis_sync.Redis) -> None:
    c = new_campaign()
    stub.StartDispatch(start_req(c, epoch=1, chips=2), metadata=MD)
    assert len(queued(rds, c)) == 2

    paused = stub.PauseDispatch(pb.PauseDispatchRequest(campaign_id=c, epoch=2), metadata=MD)

    assert paused.dispatch.state == pb.DISPATCH_STATE_PAUSED and paused.dispatch.epoch == 2
    assert all(lane.state == pb.LANE_STATE_STOPPED for lane in paused.dispatch.lanes)
    assert queued(rds, c) == []
    assert rds.get(f"whago:fence:{c}") == b"stop:2"

    stub.StartDispatch(start_req(c, epoch=3, chips=2), metadata=MD)
    assert queued(rds, c) == [f"lane:{c}:chip-0:3:2", f"lane:{c}:chip-1:3:2"]


def test_cancel_revokes_queued_aborts_running_and_forgets(
        stub: pbg.DispatcherServiceStub, rds: redis_sync.Redis) -> None:
    c = new_campaign()
    stub.StartDispatch(start_req(c, epoch=1, chips=3), metadata=MD)
    running = f"lane:{c}:chip-0:1:1"
    rds.psetex(f"arq:in-progress:{running}", 60_000, b"1")  # as if a worker had picked it up

    resp = stub.CancelDispatch(pb.CancelDispatchRequest(campaign_id=c, epoch=2), metadata=MD)

    assert (resp.revoked_jobs, resp.aborted_jobs) == (2, 1)
    assert rds.zscore("arq:abort", running) is not None
    assert queued(rds, c) == [running]  # arq itself removes an aborted job when it ends
    with pytest.raises(grpc.RpcError) as e:
        stub.GetDispatch(pb.GetDispatchRequest(campaign_id=c), metadata=MD)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert rds.get(f"whago:fence:{c}") == b"stop:2"  # stale jobs still cannot send
    rds.delete(f"arq:in-progress:{running}")
    rds.zrem(QUEUE, running)


def test_pause_returns_only_after_the_in_flight_request_ended(
        stub: pbg.DispatcherServiceStub, rds: redis_sync.Redis) -> None:
    c = new_campaign()
    stub.StartDispatch(start_req(c, epoch=1, chips=1), metadata=MD)
    token = "tok-" + secrets.token_hex(4)
    rds.zadd(f"whago:inflight:{c}", {token: time.time() + 30})  # a send that left, as a lane does it
    ended = threading.Event()

    def request_ends() -> None:
        time.sleep(1.0)
        rds.zrem(f"whago:inflight:{c}", token)
        ended.set()

    t = threading.Thread(target=request_ends)
    t.start()
    stub.PauseDispatch(pb.PauseDispatchRequest(campaign_id=c, epoch=2), metadata=MD, timeout=30)
    ended_before_return = ended.is_set()
    t.join()
    assert ended_before_return


def test_bad_input_is_invalid_argument_with_field_violations(stub: pbg.DispatcherServiceStub) -> None:
    c = new_campaign()
    bad = start_req(c, epoch=1, chips=2, interval_min_seconds=10, interval_max_seconds=5)
    bad.lanes[1].waha_base_url = "not a url"
    bad.lanes[1].waha_session = ""
    with pytest.raises(grpc.RpcError) as e:
        stub.StartDispatch(bad, metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    v = field_violations(e.value)
    assert "lanes[0].pacing.interval_min_seconds" in v
    assert "lanes[1].waha_base_url" in v and "lanes[1].waha_session" in v

    with pytest.raises(grpc.RpcError) as e:
        stub.StartDispatch(pb.StartDispatchRequest(campaign_id="", epoch=-1), metadata=MD)
    v = field_violations(e.value)
    assert {"campaign_id", "epoch", "lanes"} <= set(v)

    w = start_req(c)
    w.lanes[0].pacing.window.CopyFrom(rpb.SendingWindow(timezone="Mars/Base", start_hour=10, end_hour=9))
    with pytest.raises(grpc.RpcError) as e:
        stub.StartDispatch(w, metadata=MD)
    v = field_violations(e.value)
    assert "lanes[0].pacing.window.end_hour" in v and "lanes[0].pacing.window.timezone" in v

    with pytest.raises(grpc.RpcError) as e:
        stub.PauseDispatch(pb.PauseDispatchRequest(campaign_id=""), metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.GetDispatch(pb.GetDispatchRequest(), metadata=MD)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_serving(disp_server: ServiceProcess) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{disp_server.port}")
    try:
        for svc in ("", "whago.dispatcher.v1.DispatcherService"):
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        ch.close()


def test_redis_down_is_unavailable(workdir: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    p = _server("dispatcher-noredis", dead, workdir)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{p.port}")
        with pytest.raises(grpc.RpcError) as e:
            pbg.DispatcherServiceStub(ch).GetDispatch(pb.GetDispatchRequest(campaign_id="x"), metadata=MD,
                                                      timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        _, msg, details = _status(e.value)
        assert msg.startswith("redis unavailable: ") and details == []
        ch.close()
    finally:
        p.stop()


def _status(e: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[object]]:
    """(code, message, unpacked details) exactly as a client sees them."""
    st = rpc_status.from_call(e)  # type: ignore[arg-type]
    details: list[object] = []
    if st is not None:
        for d in st.details:
            for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                m = cls()
                if d.Unpack(m):
                    details.append(m)
    return e.code(), e.details(), details


def test_error_statuses_messages_and_details_are_the_contract(stub: pbg.DispatcherServiceStub) -> None:
    c = new_campaign()
    req = pb.GetDispatchRequest(campaign_id=c)
    cases: list[tuple[object, list[tuple[str, str]], tuple[grpc.StatusCode, str, list[object]]]] = [
        (req, [], (grpc.StatusCode.UNAUTHENTICATED, "missing authorization: Bearer <service token>", [])),
        (req, [("authorization", "Basic abc")],
         (grpc.StatusCode.UNAUTHENTICATED, "authorization must be 'Bearer <token>'", [])),
        (req, [("authorization", "Bearer nope")],
         (grpc.StatusCode.PERMISSION_DENIED, "DispatcherService accepts only the service token", [])),
        (pb.GetDispatchRequest(), MD, (grpc.StatusCode.INVALID_ARGUMENT, "campaign_id: required", [
            error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="campaign_id", description="required")])])),
        (req, MD, (grpc.StatusCode.NOT_FOUND, f"no dispatch for campaign {c}", [error_details_pb2.ErrorInfo(
            reason="DISPATCH_NOT_FOUND", domain="dispatcher.whago", metadata={"campaign_id": c})])),
    ]
    for r, md, want in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.GetDispatch(r, metadata=md)
        assert _status(e.value) == want

    stub.StartDispatch(start_req(c, epoch=5), metadata=MD)
    stale = error_details_pb2.ErrorInfo(reason="STALE_EPOCH", domain="dispatcher.whago",
                                        metadata={"campaign_id": c, "current": "run:5", "epoch": "4"})
    msg = "epoch 4 is older than the campaign's current dispatch (run:5)"
    for call in (lambda: stub.StartDispatch(start_req(c, epoch=4), metadata=MD),
                 lambda: stub.PauseDispatch(pb.PauseDispatchRequest(campaign_id=c, epoch=4), metadata=MD),
                 lambda: stub.CancelDispatch(pb.CancelDispatchRequest(campaign_id=c, epoch=4), metadata=MD)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _status(e.value) == (grpc.StatusCode.FAILED_PRECONDITION, msg, [stale])
    assert stub.GetDispatch(req, metadata=MD).state == pb.DISPATCH_STATE_RUNNING  # a refused stop changed nothing


def test_one_place_maps_every_exception_to_a_status() -> None:
    nf = errors.NotFound("X", "gone")
    assert to_service_error(nf) is nf
    st = to_service_error(StaleEpoch("c1", 4, "run:5"))
    assert isinstance(st, errors.FailedPrecondition) and st.reason == "STALE_EPOCH"
    assert st.message == "epoch 4 is older than the campaign's current dispatch (run:5)"
    down = to_service_error(RedisConnectionError("boom"))
    assert (down.code, down.message, down.details) == (grpc.StatusCode.UNAVAILABLE,
                                                       "redis unavailable: ConnectionError", [])
    bug = to_service_error(ValueError("secret detail"))
    assert (bug.code, bug.message) == (grpc.StatusCode.INTERNAL, "internal error: ValueError")
