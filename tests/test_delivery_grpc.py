"""DeliveryService over real gRPC against the running campaign_service: auth, validation with
field violations, the lease/report protocol a lane follows, chip state, media, throughput."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from campaign_service.db.engine import Database
from campaign_service.db.models import Media
from campaign_service.states import CreditKind
from tests.conftest import SERVICE_TOKEN, auth
from tests.test_delivery_fixtures import (
    PAUSED,
    campaign_row,
    check_counters,
    delivery_db,
    make_world,
    message_rows,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as res

__all__ = ["delivery_db"]

SERVICE = auth(SERVICE_TOKEN)


@pytest.fixture(scope="module")
def stub(campaign_channel: grpc.Channel) -> dgrpc.DeliveryServiceStub:
    return dgrpc.DeliveryServiceStub(campaign_channel)


def violations(err: grpc.RpcError) -> set[str]:
    st = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert st is not None
    out: set[str] = set()
    for d in st.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            out |= {v.field for v in br.field_violations}
    return out


def lease_req(w: object, chip: str, n: int = 10, epoch: int = 1, secs: int = 60) -> dpb.LeaseMessagesRequest:
    return dpb.LeaseMessagesRequest(campaign_id=w.cid, chip_id=chip, epoch=epoch,  # type: ignore[attr-defined]
                                    max_messages=n, lease_seconds=secs, lease_owner="grpc-test")


def test_user_key_is_permission_denied_on_every_rpc(stub: dgrpc.DeliveryServiceStub,
                                                    create_user: Callable[..., str]) -> None:
    md = auth(create_user())
    calls: list[Callable[[], object]] = [
        lambda: stub.LeaseMessages(dpb.LeaseMessagesRequest(campaign_id=str(uuid.uuid4())), metadata=md),
        lambda: stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=str(uuid.uuid4())), metadata=md),
        lambda: stub.ReportChipState(dpb.ReportChipStateRequest(chip_id=str(uuid.uuid4())), metadata=md),
        lambda: stub.GetMediaContent(dpb.GetMediaContentRequest(media_id=str(uuid.uuid4())), metadata=md),
        lambda: stub.ReportLaneWait(dpb.ReportLaneWaitRequest(campaign_id=str(uuid.uuid4())), metadata=md),
        lambda: stub.ReportAcks(dpb.ReportAcksRequest(), metadata=md),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        stub.LeaseMessages(dpb.LeaseMessagesRequest(), metadata=auth("wrong"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_input_is_invalid_argument_with_the_fields(stub: dgrpc.DeliveryServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.LeaseMessages(dpb.LeaseMessagesRequest(campaign_id=str(uuid.uuid4()), chip_id="x", max_messages=0,
                                                    lease_seconds=3601), metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"chip_id", "max_messages", "lease_seconds"}
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=str(uuid.uuid4()), reports=[
            dpb.DeliveryReport(message_id="1"), dpb.DeliveryReport(message_id="abc", outcome=2)]), metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"reports[1].message_id"}
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=str(uuid.uuid4()), reports=[
            dpb.DeliveryReport(message_id="1")]), metadata=SERVICE)
    assert violations(e.value) == {"reports[0].outcome"}
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportChipState(dpb.ReportChipStateRequest(chip_id=str(uuid.uuid4())), metadata=SERVICE)
    assert violations(e.value) == {"state"}
    with pytest.raises(grpc.RpcError) as e:
        stub.LeaseMessages(lease_req(type("W", (), {"cid": str(uuid.uuid4())})(), str(uuid.uuid4())),
                           metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_lane_protocol_over_grpc(stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=3, chips=1, settings={"maxFailures": 5})
    r = stub.LeaseMessages(lease_req(w, w.chip(0), n=2), metadata=SERVICE)
    assert r.campaign_state == res.CAMPAIGN_STATE_RUNNING and r.epoch == 1 and r.remaining == 1
    assert [m.message_id for m in r.messages] == [str(i) for i in w.message_ids[:2]]
    m0 = r.messages[0]
    assert m0.text == f"Hi Contact 0 ({w.contact_phones[0]}) City0" and m0.attempts == 1
    assert m0.lease_expire_time.ToDatetime().timestamp() > time.time() + 30
    stale = stub.LeaseMessages(lease_req(w, w.chip(0), epoch=0), metadata=SERVICE)
    assert not stale.messages and stale.epoch == 1
    out = stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=[
        dpb.DeliveryReport(message_id=m0.message_id, outcome=dpb.DELIVERY_OUTCOME_ATTEMPTING,
                           waha_message_id="true_1@c.us_A"),
        dpb.DeliveryReport(message_id=m0.message_id, outcome=dpb.DELIVERY_OUTCOME_SENT,
                           waha_message_id="true_1@c.us_A"),
        dpb.DeliveryReport(message_id=r.messages[1].message_id, outcome=dpb.DELIVERY_OUTCOME_RELEASED),
    ]), metadata=SERVICE)
    assert out.campaign_state == res.CAMPAIGN_STATE_RUNNING and out.epoch == 1
    rest = stub.LeaseMessages(lease_req(w, w.chip(0)), metadata=SERVICE)
    assert len(rest.messages) == 2 and rest.remaining == 0
    out = stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=[
        dpb.DeliveryReport(message_id=m.message_id, outcome=dpb.DELIVERY_OUTCOME_UNKNOWN) for m in rest.messages
    ]), metadata=SERVICE)
    assert out.campaign_state == res.CAMPAIGN_STATE_COMPLETED
    row = campaign_row(delivery_db, w.campaign_id)
    assert (row.sent_count, row.failed_count, row.pending_count) == (1, 2, 0)
    assert {m.failure_reason for m in message_rows(delivery_db, w.campaign_id) if m.state == 6} == {"OUTCOME_UNKNOWN"}
    check_counters(delivery_db, w.campaign_id)


def test_chip_state_over_grpc(stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=4, chips=2)
    out = stub.ReportChipState(dpb.ReportChipStateRequest(chip_id=w.chip(0), state=res.CHIP_STATE_RESTRICTED,
                                                          reason="463"), metadata=SERVICE)
    assert out.chip.id == w.chip(0) and out.chip.state == res.CHIP_STATE_RESTRICTED and out.chip.waha_api_key == ""
    assert list(out.redistributed_campaign_ids) == [w.cid] and not out.paused_campaign_ids
    # 422 on the last chip: transient, nothing paused; its lane keeps leasing once the session is back.
    out = stub.ReportChipState(dpb.ReportChipStateRequest(chip_id=w.chip(1), state=res.CHIP_STATE_UNAVAILABLE,
                                                          reason="422"), metadata=SERVICE)
    assert not out.paused_campaign_ids and not out.redistributed_campaign_ids
    assert campaign_row(delivery_db, w.campaign_id).state == res.CAMPAIGN_STATE_RUNNING
    rows = message_rows(delivery_db, w.campaign_id)
    assert {(m.state, str(m.chip_id)) for m in rows} == {(res.MESSAGE_STATE_PENDING, w.chip(1))} and len(rows) == 4
    # 463 on it too: nothing can send any more, so the campaign pauses.
    out = stub.ReportChipState(dpb.ReportChipStateRequest(chip_id=w.chip(1), state=res.CHIP_STATE_RESTRICTED,
                                                          reason="463"), metadata=SERVICE)
    lease = stub.LeaseMessages(lease_req(w, w.chip(1)), metadata=SERVICE)
    assert lease.campaign_state == res.CAMPAIGN_STATE_PAUSED and lease.epoch == 2 and not lease.messages


def test_media_content_over_grpc(stub: dgrpc.DeliveryServiceStub, delivery_db: Database,
                                 stack_env: dict[str, str]) -> None:
    mid = uuid.uuid4()
    w = make_world(delivery_db, contacts=1, chips=1, templates=[{"text": "see", "mediaId": str(mid)}])
    media_dir = Path(stack_env["WHAGO_MEDIA_DIR"])
    (media_dir / w.cid).mkdir(parents=True, exist_ok=True)
    (media_dir / w.cid / "a.png").write_bytes(b"\x89PNG-data")
    with delivery_db.transaction() as s:
        s.add(Media(id=mid, campaign_id=w.campaign_id, filename="a.png", mime_type="image/png", size_bytes=9,
                    path=f"{w.cid}/a.png"))
    leased = stub.LeaseMessages(lease_req(w, w.chip(0)), metadata=SERVICE).messages[0]
    assert leased.media.id == str(mid) and leased.media.mime_type == "image/png" and leased.text == "see"
    got = stub.GetMediaContent(dpb.GetMediaContentRequest(media_id=str(mid)), metadata=SERVICE)
    assert got.content == b"\x89PNG-data" and got.media.filename == "a.png" and got.media.size_bytes == 9
    with pytest.raises(grpc.RpcError) as e:
        stub.GetMediaContent(dpb.GetMediaContentRequest(media_id=str(uuid.uuid4())), metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_lease_records_the_waha_ids_taken_up_front(stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    """LeaseMessages with waha_message_ids records them as ATTEMPTING would, in the same step: on the
    i-th message in send order, never on media nor over an earlier attempt's id; spare ids are dropped."""
    mid = uuid.uuid4()
    w = make_world(delivery_db, contacts=5, chips=1,
                   templates=[{"text": "Hi {{name}}"}, {"text": "see", "mediaId": str(mid)}])
    with delivery_db.transaction() as s:
        s.add(Media(id=mid, campaign_id=w.campaign_id, filename="a.png", mime_type="image/png", size_bytes=1,
                    path=f"{w.cid}/a.png"))
    req = lease_req(w, w.chip(0), n=2, secs=1)
    req.waha_message_ids.extend(["ID-A", "ID-B", "ID-SPARE"])
    first = stub.LeaseMessages(req, metadata=SERVICE).messages
    assert [m.attempt_waha_message_id for m in first] == ["ID-A", ""]  # the second one is media
    assert first[1].media.id == str(mid) and not first[0].waha_message_id
    rows = {m.id: m for m in message_rows(delivery_db, w.campaign_id)}
    assert rows[int(first[0].message_id)].waha_message_id == "ID-A"
    assert rows[int(first[0].message_id)].state == res.MESSAGE_STATE_SENDING
    assert rows[int(first[1].message_id)].waha_message_id is None
    assert "ID-SPARE" not in {m.waha_message_id for m in rows.values()}
    time.sleep(1.2)  # both leases expire: the text one comes back carrying its earlier attempt's id
    req = lease_req(w, w.chip(0), n=5)
    req.waha_message_ids.extend(["ID-C", "ID-D", "ID-E"])  # fewer ids than messages
    again = stub.LeaseMessages(req, metadata=SERVICE).messages
    assert [m.message_id for m in again] == [str(i) for i in w.message_ids]
    assert again[0].waha_message_id == "ID-A" and again[0].attempt_waha_message_id == ""  # look it up first
    assert [m.attempt_waha_message_id for m in again[1:]] == ["", "ID-E", "", ""]  # by position
    with pytest.raises(grpc.RpcError) as e:
        bad = lease_req(w, w.chip(0))
        bad.waha_message_ids.extend(["ok", ""])
        stub.LeaseMessages(bad, metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(e.value) == {"waha_message_ids[1]"}


def test_many_lanes_leasing_one_message_at_a_time_get_each_message_once(
        stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    """16 lanes at once, one message per lease and one report per send (the worst case for row
    locks): every message is leased exactly once and reported SENT. (Its rate is `make bench`'s
    `lease` figure, not a test.)"""
    lanes = 16
    w = make_world(delivery_db, contacts=lanes * 60, chips=lanes)
    leased: list[str] = []
    lock = threading.Lock()

    def lane(i: int) -> None:
        while True:
            r = stub.LeaseMessages(lease_req(w, w.chip(i), n=1), metadata=SERVICE)
            if not r.messages:
                return
            m = r.messages[0]
            stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=[dpb.DeliveryReport(
                message_id=m.message_id, outcome=dpb.DELIVERY_OUTCOME_SENT, waha_message_id=f"wa-{m.message_id}")]),
                metadata=SERVICE)
            with lock:
                leased.append(m.message_id)

    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, range(lanes)))
    assert len(leased) == len(set(leased)) == lanes * 60
    row = campaign_row(delivery_db, w.campaign_id)
    assert row.state == 6 and row.sent_count == lanes * 60


def test_remaining_is_counted_up_to_the_larger_of_the_batch_and_200(stub: dgrpc.DeliveryServiceStub,
                                                                     delivery_db: Database) -> None:
    """A lane only sizes its next batch with it: a big lane is not counted whole on every lease."""
    w = make_world(delivery_db, contacts=1403, chips=1)
    first = stub.LeaseMessages(lease_req(w, w.chip(0), n=1), metadata=SERVICE)
    assert len(first.messages) == 1 and first.remaining == 200  # 1402 left: capped at 200
    big = stub.LeaseMessages(lease_req(w, w.chip(0), n=400), metadata=SERVICE)
    assert len(big.messages) == 400 and big.remaining == 400  # 1002 left: capped at the batch size
    rest = stub.LeaseMessages(lease_req(w, w.chip(0), n=1000), metadata=SERVICE)
    assert len(rest.messages) == 1000 and rest.remaining == 2  # under the cap: exact
    # A message handed back is leased again first; the count still sees the two left after it.
    released = [dpb.DeliveryReport(message_id=m.message_id, outcome=dpb.DELIVERY_OUTCOME_RELEASED)
                for m in first.messages]
    stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=released),
                          metadata=SERVICE)
    last = stub.LeaseMessages(lease_req(w, w.chip(0), n=1), metadata=SERVICE)
    assert [m.message_id for m in last.messages] == [m.message_id for m in first.messages]
    assert last.remaining == 2


def _lane_row(db: Database, w: object, chip: str) -> Any:
    with db.session() as s:
        return s.execute(text("SELECT resume_at, resume_epoch, last_seen_at FROM delivery_lanes"
                              " WHERE campaign_id = :c AND chip_id = :chip"),
                         {"c": w.cid, "chip": chip}).one_or_none()  # type: ignore[attr-defined]


def wait_req(w: object, chip: str, resume: float | None, epoch: int = 1, reason: str = "hourly cap"
             ) -> dpb.ReportLaneWaitRequest:
    r = dpb.ReportLaneWaitRequest(campaign_id=w.cid, chip_id=chip, epoch=epoch, reason=reason)  # type: ignore[attr-defined]
    if resume is not None:
        r.resume_time.FromNanoseconds(int(resume * 1e9))
    return r


def test_lane_wait_is_recorded_for_the_current_epoch_only_and_the_next_lease_clears_it(
        stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=4, chips=2)
    resume = time.time() + 1800
    out = stub.ReportLaneWait(wait_req(w, w.chip(0), resume), metadata=SERVICE)
    assert out.recorded and out.campaign_state == res.CAMPAIGN_STATE_RUNNING and out.epoch == 1
    row = _lane_row(delivery_db, w, w.chip(0))
    assert row.resume_epoch == 1 and abs(row.resume_at.timestamp() - resume) < 0.01

    # Another epoch (a stale lane, or one from the future) records nothing and changes nothing.
    for epoch in (0, 2):
        assert not stub.ReportLaneWait(wait_req(w, w.chip(0), resume + 60, epoch=epoch), metadata=SERVICE).recorded
    assert _lane_row(delivery_db, w, w.chip(0)).resume_at == row.resume_at
    # The lane leasing again is alive by itself: the wait is cleared.
    assert stub.LeaseMessages(lease_req(w, w.chip(0), n=1), metadata=SERVICE).messages
    after = _lane_row(delivery_db, w, w.chip(0))
    assert after.resume_at is None and after.resume_epoch is None

    paused = make_world(delivery_db, contacts=2, chips=1, state=PAUSED)
    got = stub.ReportLaneWait(wait_req(paused, paused.chip(0), resume), metadata=SERVICE)
    assert not got.recorded and got.campaign_state == res.CAMPAIGN_STATE_PAUSED
    assert _lane_row(delivery_db, paused, paused.chip(0)) is None


def test_lane_wait_bad_input_and_unknown_lanes(stub: dgrpc.DeliveryServiceStub, delivery_db: Database) -> None:
    w = make_world(delivery_db, contacts=2, chips=1)
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportLaneWait(dpb.ReportLaneWaitRequest(campaign_id="nope", chip_id="", reason="x" * 501),
                            metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"campaign_id", "chip_id", "resume_time", "reason"}
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportLaneWait(wait_req(w, w.chip(0), time.time() + 8 * 86400), metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(e.value) == {"resume_time"}
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportLaneWait(dpb.ReportLaneWaitRequest(campaign_id=str(uuid.uuid4()), chip_id=w.chip(0),
                                                      resume_time=wait_req(w, w.chip(0), time.time()).resume_time),
                            metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # a chip that is not one of the campaign's lanes
        stub.ReportLaneWait(wait_req(w, str(uuid.uuid4()), time.time() + 60), metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert _lane_row(delivery_db, w, w.chip(0)) is None


def _ack(waha_id: str, outcome: int) -> dpb.MessageAck:
    return dpb.MessageAck(waha_message_id=waha_id, outcome=outcome)  # type: ignore[arg-type]


def test_acks_move_messages_to_delivered_then_read_never_backwards(stub: dgrpc.DeliveryServiceStub,
                                                                   delivery_db: Database) -> None:
    """Receipts find messages by either id form: the serialized one WAHA answered with, or the bare
    one chosen before the send (a receipt may beat the SENT report)."""
    w = make_world(delivery_db, contacts=3, chips=1)
    tag = uuid.uuid4().hex[:12].upper()
    req = lease_req(w, w.chip(0), n=3)
    req.waha_message_ids.extend([f"3EB0A{tag}", f"3EB0B{tag}", f"3EB0C{tag}"])
    msgs = stub.LeaseMessages(req, metadata=SERVICE).messages
    chat = msgs[0].chat_id
    stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=[
        dpb.DeliveryReport(message_id=msgs[0].message_id, outcome=dpb.DELIVERY_OUTCOME_SENT,
                           waha_message_id=f"true_{chat}_3EB0A{tag}")]), metadata=SERVICE)
    out = stub.ReportAcks(dpb.ReportAcksRequest(acks=[
        _ack(f"true_{chat}_3EB0A{tag}", dpb.DELIVERY_OUTCOME_DELIVERED),   # SENT, full id stored
        _ack(f"true_{msgs[1].chat_id}_3EB0B{tag}", dpb.DELIVERY_OUTCOME_READ),  # still SENDING, bare id stored
        _ack(f"true_{chat}_3EB0A{tag}", dpb.DELIVERY_OUTCOME_DELIVERED),   # a duplicate webhook
        _ack(f"true_{chat}_3EB0NOBODY{tag}", dpb.DELIVERY_OUTCOME_READ),   # another sender's message
    ]), metadata=SERVICE)
    assert (out.matched, out.unmatched) == (3, 1)
    states = {m.id: m.state for m in message_rows(delivery_db, w.campaign_id)}
    ids = [int(m.message_id) for m in msgs]
    assert [states[i] for i in ids] == [4, 5, 2]  # DELIVERED, READ, still SENDING
    # Never backwards: DELIVERED after READ, and the lane's late SENT report, change nothing.
    stub.ReportAcks(dpb.ReportAcksRequest(acks=[_ack(f"3EB0B{tag}", dpb.DELIVERY_OUTCOME_DELIVERED)]),
                    metadata=SERVICE)
    stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=[
        dpb.DeliveryReport(message_id=msgs[1].message_id, outcome=dpb.DELIVERY_OUTCOME_SENT,
                           waha_message_id=f"true_{msgs[1].chat_id}_3EB0B{tag}")]), metadata=SERVICE)
    assert {m.id: m.state for m in message_rows(delivery_db, w.campaign_id)}[ids[1]] == 5
    row = campaign_row(delivery_db, w.campaign_id)
    assert (row.sent_count, row.delivered_count, row.read_count, row.pending_count) == (2, 2, 1, 1)
    check_counters(delivery_db, w.campaign_id)


def test_acks_bad_input_is_invalid_argument_with_the_fields(stub: dgrpc.DeliveryServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportAcks(dpb.ReportAcksRequest(acks=[_ack("3EB0X", dpb.DELIVERY_OUTCOME_SENT),
                                                    _ack("", dpb.DELIVERY_OUTCOME_READ)]), metadata=SERVICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"acks[0].outcome", "acks[1].waha_message_id"}
    assert stub.ReportAcks(dpb.ReportAcksRequest(), metadata=SERVICE).matched == 0


def test_reports_settle_credits_on_the_campaign_row_not_the_users_row(stub: dgrpc.DeliveryServiceStub,
                                                                      delivery_db: Database) -> None:
    """Every lane of a tenant reports into one users row otherwise: a report of sent and failed
    messages goes through while another transaction holds that row (a Start reserving, a Cancel
    releasing), and what the campaign settled reaches the row when it completes."""
    w = make_world(delivery_db, contacts=3, chips=1)  # 10**6 credits, 3 reserved
    m = stub.LeaseMessages(lease_req(w, w.chip(0), n=3), metadata=SERVICE).messages

    def report(*outcomes: tuple[dpb.LeasedMessage, int]) -> dpb.ReportDeliveriesResponse:
        return stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=w.cid, reports=[
            dpb.DeliveryReport(message_id=msg.message_id, outcome=o, waha_message_id=msg.attempt_waha_message_id)
            for msg, o in outcomes]), metadata=SERVICE, timeout=30)  # (lock_timeout is 5 s)

    def rows() -> tuple[int, ...]:
        with delivery_db.session() as s:
            return tuple(s.execute(text(
                "SELECT u.credits, u.credits_reserved, c.credits_consumed_unfolded, c.credits_released_unfolded"
                " FROM users u, campaigns c WHERE u.id = :u AND c.id = :c"),
                {"u": w.user_id, "c": w.campaign_id}).one())

    with delivery_db.transaction() as held:
        held.execute(text("SELECT 1 FROM users WHERE id = :u FOR NO KEY UPDATE"), {"u": w.user_id})
        out = report((m[0], dpb.DELIVERY_OUTCOME_SENT), (m[1], dpb.DELIVERY_OUTCOME_FAILED))
        assert out.campaign_state == res.CAMPAIGN_STATE_RUNNING
    assert rows() == (10**6 - 3, 3, 1, 1)  # on the campaign row; the users row untouched
    assert report((m[2], dpb.DELIVERY_OUTCOME_SENT)).campaign_state == res.CAMPAIGN_STATE_COMPLETED
    assert rows() == (10**6 - 2, 0, 0, 0)  # folded at completion: the failed message's credit is back
    with delivery_db.session() as s:
        entries = s.execute(text("SELECT kind, sum(amount) FROM credit_transactions WHERE campaign_id = :c"
                                 " GROUP BY kind"), {"c": w.campaign_id}).all()
    assert dict(entries) == {int(CreditKind.RESERVE): 3, int(CreditKind.CONSUME): 2, int(CreditKind.RELEASE): 1}
