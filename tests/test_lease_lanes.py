"""LeaseLanes (several lanes' leases in one call and one transaction) over real gRPC, and the
worker's side of it: the group commit that coalesces its lanes' leases, and the fallback to
LeaseMessages against a campaign service without LeaseLanes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import text

from campaign_service.db.engine import Database
from campaign_service.delivery.common import PENDING, SENDING
from devstack.servers import free_port
from dispatcher_service.delivery import DeliveryClient
from dispatcher_service.group_commit import GroupCommit
from tests.conftest import auth
from tests.fuzz import messages
from tests.test_delivery_fixtures import delivery_db, make_world
from tests.test_delivery_grpc import SERVICE, lease_req, stub, violations
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as res

__all__ = ["delivery_db", "stub"]


def _states(db: Database, cid: str) -> dict[int, int]:
    with db.transaction() as s:
        return {r[0]: r[1] for r in s.execute(text(
            "SELECT state, count(*) FROM campaign_messages WHERE campaign_id = :c GROUP BY state"), {"c": cid})}


def test_each_lease_is_answered_as_leasemessages_would_in_one_transaction(
        stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=12, chips=3)
    # chip 0 holds seq 0, 3, 6, 9; chip 1 seq 1, 4, 7, 10.
    r = stub.LeaseLanes(dpb.LeaseLanesRequest(leases=[
        lease_req(w, w.chip(0), n=2), lease_req(w, w.chip(1), n=10), lease_req(w, w.chip(0), n=1),
        lease_req(w, w.chip(2), epoch=0)]), metadata=SERVICE)
    assert len(r.leases) == 4
    a, b, again, stale = r.leases
    assert [m.message_id for m in a.messages] == [str(w.message_ids[i]) for i in (0, 3)] and a.remaining == 2
    assert [m.message_id for m in b.messages] == [str(w.message_ids[i]) for i in (1, 4, 7, 10)] and b.remaining == 0
    # The same lane twice: the second lease takes what the first left.
    assert [m.message_id for m in again.messages] == [str(w.message_ids[6])] and again.remaining == 1
    assert not stale.messages and stale.epoch == 1 and stale.remaining == 4
    assert all(x.campaign_state == res.CAMPAIGN_STATE_RUNNING and x.epoch == 1 for x in r.leases)
    assert a.messages[0].text == f"Hi Contact 0 ({w.contact_phones[0]}) City0"
    # One transaction: now() is its start, so every lease of equal length ends at the same instant.
    expiries = {m.lease_expire_time.ToNanoseconds() for x in (a, b, again) for m in x.messages}
    assert len(expiries) == 1
    assert _states(delivery_db, w.cid) == {SENDING: 7, PENDING: 5}
    upper = lease_req(w, w.chip(1))
    upper.campaign_id = w.cid.upper()  # the same campaign, spelled otherwise
    r = stub.LeaseLanes(dpb.LeaseLanesRequest(leases=[lease_req(w, w.chip(2), n=1), upper]), metadata=SERVICE)
    assert [len(x.messages) for x in r.leases] == [1, 0]


def test_a_bad_lease_fails_the_call_and_leases_nothing(stub: dgrpc.DeliveryServiceStub,
                                                       delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=6, chips=2)
    other = make_world(delivery_db, contacts=1, chips=1)

    def fails(*leases: dpb.LeaseMessagesRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            stub.LeaseLanes(dpb.LeaseLanesRequest(leases=leases), metadata=SERVICE)
        return e.value

    bad = lease_req(w, w.chip(1))
    bad.max_messages = 0
    bad.chip_id = "nope"
    e = fails(lease_req(w, w.chip(0)), bad)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e) == {"leases[1].max_messages", "leases[1].chip_id"}
    e = fails(lease_req(w, w.chip(0)), lease_req(other, other.chip(0)))
    assert violations(e) == {"leases[1].campaign_id"}
    assert violations(fails()) == {"leases"}
    assert violations(fails(*[lease_req(w, w.chip(0), n=1)] * 101)) == {"leases"}
    e = fails(lease_req(w, w.chip(0), n=600), lease_req(w, w.chip(1), n=401))  # 1001 messages in all
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(e) == {"leases"}
    e = fails(lease_req(type("W", (), {"cid": str(uuid.uuid4())})(), w.chip(0)))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert _states(delivery_db, w.cid) == {PENDING: 6}  # nothing leased by any of them


def test_user_keys_cannot_lease_lanes(stub: dgrpc.DeliveryServiceStub, create_user: Callable[..., str]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.LeaseLanes(dpb.LeaseLanesRequest(), metadata=auth(create_user()))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS}


def test_any_lease_lanes_request_gets_a_documented_status(stub: dgrpc.DeliveryServiceStub,
                                                           delivery_db: Database) -> None:
    """Whatever the worker (or anything holding the service token) sends: OK, INVALID_ARGUMENT or
    NOT_FOUND, never UNKNOWN or INTERNAL."""
    w = make_world(delivery_db, contacts=20, chips=2)
    ids = [w.cid, w.chip(0), w.chip(1)]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages(dpb.LeaseLanesRequest.DESCRIPTOR, ids))
    def call(req: dpb.LeaseLanesRequest) -> None:
        try:
            stub.LeaseLanes(req, metadata=SERVICE, timeout=30)
        except grpc.RpcError as e:
            assert e.code() not in NEVER, (e.code(), e.details())

    call()


def test_group_commit_carries_what_arrives_meanwhile_in_the_next_call() -> None:
    """One call in flight per key; each caller gets its own result; the caps split batches; an
    error reaches the callers of its call only."""
    calls: list[tuple[str, list[int]]] = []

    async def run() -> None:
        gate = asyncio.Event()

        async def send(key: str, items: list[int], _budget: float | None) -> list[int]:
            calls.append((key, items))
            if items == [1]:
                await gate.wait()  # the first call is in flight while the others arrive
            if -1 in items:
                raise ValueError("bad item")
            return [i * 10 for i in items]

        gc: GroupCommit[str, int, int] = GroupCommit(send, size=lambda i: abs(i), max_size=10, max_items=3)
        first = asyncio.ensure_future(gc.submit("a", 1))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(gc.submit("a", i)) for i in (2, 3, 4, 5, 6)]
        other = asyncio.ensure_future(gc.submit("b", 7))  # another key is not held up by "a"
        assert await other == 70
        await asyncio.sleep(0)
        gate.set()
        assert await first == 10
        assert [await f for f in rest] == [20, 30, 40, 50, 60]
        bad = [asyncio.ensure_future(gc.submit("c", i)) for i in (8, -1)]
        late = asyncio.ensure_future(gc.submit("c", 9))
        for f in bad:
            with pytest.raises(ValueError):
                await f
        assert await late == 90

    asyncio.run(run())
    a_calls = [items for key, items in calls if key == "a"]
    # At most three items (2, 3, 4), sizes adding up to at most 10 (5 + 6 would be 11).
    assert a_calls == [[1], [2, 3, 4], [5], [6]]
    assert [items for key, items in calls if key == "c"] == [[8, -1], [9]]


class _OnlyLeaseMessages(dgrpc.DeliveryServiceServicer):
    """A campaign service from before LeaseLanes (the generated base answers UNIMPLEMENTED)."""

    async def LeaseMessages(self, request: dpb.LeaseMessagesRequest,  # type: ignore[override]
                            context: grpc.aio.ServicerContext) -> dpb.LeaseMessagesResponse:
        return dpb.LeaseMessagesResponse(campaign_state=res.CAMPAIGN_STATE_RUNNING, epoch=request.epoch,
                                         remaining=request.max_messages)


def test_the_worker_leases_lane_by_lane_from_a_service_without_lease_lanes() -> None:
    async def run() -> list[int]:
        server = grpc.aio.server()
        dgrpc.add_DeliveryServiceServicer_to_server(_OnlyLeaseMessages(), server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        client = DeliveryClient(f"127.0.0.1:{port}", "token", call_timeout=5.0, retry_budget=5.0)
        try:
            reqs = [dpb.LeaseMessagesRequest(campaign_id="c", chip_id=str(i), epoch=3, max_messages=i + 1)
                    for i in range(3)]
            got = await client.lease_lanes(reqs)
            assert not client.lease_lanes_supported
            again = await client.lease_lanes(reqs[:1])  # straight to LeaseMessages from now on
            return [r.remaining for r in got] + [r.remaining for r in again]
        finally:
            await client.close()
            await server.stop(None)

    assert asyncio.run(run()) == [1, 2, 3, 1]


def test_group_commit_runs_up_to_in_flight_calls_of_a_key_at_once() -> None:
    """LeaseBatcher runs two LeaseLanes of a campaign at once (the campaign service works them on
    two threads); what arrives while both are busy waits for the first to end."""
    calls: list[list[int]] = []

    async def run() -> None:
        gates = {1: asyncio.Event(), 2: asyncio.Event()}
        busy = 0
        most = 0

        async def send(_key: str, items: list[int], _budget: float | None) -> list[int]:
            nonlocal busy, most
            calls.append(items)
            busy += 1
            most = max(most, busy)
            if items[0] in gates:
                await gates[items[0]].wait()
            busy -= 1
            return items

        gc: GroupCommit[str, int, int] = GroupCommit(send, size=lambda _: 1, max_size=10, max_items=10, in_flight=2)
        one = asyncio.ensure_future(gc.submit("k", 1))
        await asyncio.sleep(0)
        two = asyncio.ensure_future(gc.submit("k", 2))  # a second call while the first is in flight
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(gc.submit("k", i)) for i in (3, 4)]
        await asyncio.sleep(0.01)
        assert calls == [[1], [2]] and most == 2  # 3 and 4 wait: both calls are busy
        gates[2].set()
        assert await two == 2 and [await f for f in rest] == [3, 4]
        assert calls == [[1], [2], [3, 4]]  # together, in the call that came free
        gates[1].set()
        assert await one == 1

    asyncio.run(run())


def test_group_commit_lets_a_small_call_wait_for_company_and_a_big_one_go() -> None:
    """ReportBatcher's linger: reports of paced lanes come one or two at a time; fewer than
    `linger_below` wait `linger` for more. A call already big goes at once."""
    calls: list[list[int]] = []

    async def run() -> None:
        async def send(_key: str, items: list[int], _budget: float | None) -> list[int]:
            calls.append(items)
            return items

        gc: GroupCommit[str, int, int] = GroupCommit(send, size=lambda i: i, max_size=100, max_items=10,
                                                     linger=0.05, linger_below=10)
        first = asyncio.ensure_future(gc.submit("k", 1))
        await asyncio.sleep(0.01)
        assert calls == []  # waiting for company
        assert await asyncio.gather(first, gc.submit("k", 2)) == [1, 2]
        assert calls == [[1, 2]]
        big = asyncio.ensure_future(gc.submit("k", 20))  # 20 >= 10: no wait
        await asyncio.sleep(0.01)
        assert calls[-1] == [20] and await big == 20

    asyncio.run(run())
