"""Opt-out and suppression: the per-user suppression list (SuppressionService), numbers SKIPPED
(OPTED_OUT, uncharged) at Start and right before each send, and the inbound loop: the sandbox
posts a WAHA `message` webhook, the dispatcher's receiver forwards it, the sender is suppressed."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import sqlalchemy as sa

from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY, WEBHOOK_HMAC_KEY, IsolatedStack
from tests.helpers import BALANCE_SQL, Ops, chat_id, phones, user_id, wait_for
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import credit_service_pb2_grpc as crs_grpc
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import suppression_service_pb2 as sps
from whago.campaign.v1 import suppression_service_pb2_grpc as sps_grpc


def digits(phone: str) -> str:
    return "".join(ch for ch in phone if ch.isdigit())


class Suppressions:
    def __init__(self, channel: grpc.Channel, key: str) -> None:
        self.stub = sps_grpc.SuppressionServiceStub(channel)
        self.md = (("authorization", f"Bearer {key}"),)

    def add(self, phone: str, note: str = "") -> sps.Suppression:
        return self.stub.AddSuppression(sps.AddSuppressionRequest(phone=phone, note=note), metadata=self.md)

    def list(self, query: str = "", page_size: int = 0, token: str = "", source: int = 0
             ) -> sps.ListSuppressionsResponse:
        return self.stub.ListSuppressions(sps.ListSuppressionsRequest(
            query=query, page_size=page_size, page_token=token, source=source), metadata=self.md)  # type: ignore[arg-type]

    def all(self, query: str = "") -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            page = self.list(query, 1000, token)
            out += [s.phone for s in page.suppressions]
            token = page.next_page_token
            if not token:
                return out

    def import_(self, *reqs: sps.ImportSuppressionsRequest) -> sps.ImportSuppressionsResponse:
        return self.stub.ImportSuppressions(iter(reqs), metadata=self.md)


@pytest.fixture()
def sup(api: Ops, api_key: str, campaign_channel: grpc.Channel) -> Suppressions:
    return Suppressions(campaign_channel, api_key)


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(database_url, pool_size=2)
    yield eng
    eng.dispose()


def balance(channel: grpc.Channel, key: str) -> crs.CreditBalance:
    return crs_grpc.CreditServiceStub(channel).GetCreditBalance(
        crs.GetCreditBalanceRequest(), metadata=(("authorization", f"Bearer {key}"),))


def ledger_holds(engine: sa.Engine, key: str) -> None:
    """reserved = the user's PENDING + SENDING messages, both read in one snapshot (the lanes may
    be reporting meanwhile)."""
    uid = user_id(engine, key)
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        reserved = conn.execute(sa.text(BALANCE_SQL), {"u": uid}).one().reserved
        open_ = conn.execute(sa.text(
            "SELECT count(*) FROM campaign_messages m JOIN campaigns c ON c.id = m.campaign_id"
            " WHERE c.user_id = :u AND m.state IN (1, 2)"), {"u": uid}).scalar_one()
    assert reserved == open_


def test_suppressed_numbers_are_skipped_at_start_and_not_charged(
        api: Ops, sup: Suppressions, api_key: str, campaign_channel: grpc.Channel, sandbox_url: str,
        control: SandboxControl, engine: sa.Engine) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    numbers = phones(10)
    api.import_phones(camp.id, numbers)
    suppressed = numbers[2:5]
    sup.add(suppressed[0], note="asked by phone")
    sup.add(suppressed[1][4:])  # without the country code: normalized like contacts (default region BR)
    sup.import_(sps.ImportSuppressionsRequest(rows=[sps.SuppressionRow(phone=suppressed[2])]))
    assert sorted(sup.all()) == sorted(digits(p) for p in suppressed)
    before = balance(campaign_channel, api_key)

    started = api.start(camp.id)
    assert (started.pending_count, started.skipped_count) == (7, 3)
    ledger_holds(engine, api_key)
    done = api.wait_final(camp.id)
    assert done.state == res.CAMPAIGN_STATE_COMPLETED
    assert (done.sent_count, done.skipped_count, done.failed_count) == (7, 3, 0)
    msgs = {m.phone: m for m in api.messages(camp.id)}
    for p in suppressed:
        assert (msgs[digits(p)].state, msgs[digits(p)].failure_reason) == (res.MESSAGE_STATE_SKIPPED, "OPTED_OUT")
    after = balance(campaign_channel, api_key)
    assert (before.available - after.available, after.reserved) == (7, 0)  # only the 7 sent were charged
    sent_to = {s["chat_id"] for s in control.sends(session=chip.waha_session)}
    assert sent_to.isdisjoint({chat_id(p) for p in suppressed}) and len(sent_to) == 7
    ledger_holds(engine, api_key)


def test_a_campaign_whose_every_number_is_suppressed_completes_without_sending(
        api: Ops, sup: Suppressions, sandbox_url: str, control: SandboxControl) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    numbers = phones(3)
    api.import_phones(camp.id, numbers)
    for p in numbers:
        sup.add(p)
    assert api.start(camp.id).skipped_count == 3
    done = api.wait_final(camp.id, timeout=30)
    assert (done.state, done.sent_count, done.skipped_count) == (res.CAMPAIGN_STATE_COMPLETED, 0, 3)
    assert control.sends(session=chip.waha_session) == []


def post_signed(url: str, event: object, key: str | None = WEBHOOK_HMAC_KEY, raw: bytes | None = None
                ) -> tuple[int, object]:
    body = raw if raw is not None else json.dumps(event).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Webhook-Hmac"] = hmac.new(key.encode(), body, hashlib.sha512).hexdigest()
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture()
def receiver(stack: dict[str, ServiceProcess], ports: dict[str, int], control: SandboxControl) -> Iterator[str]:
    """The dispatcher's WAHA webhook receiver, with the sandbox posting `message` events to it."""
    url = f"http://127.0.0.1:{ports['webhooks']}/waha/webhook"
    control.configure(webhooks=[{"url": url, "events": ["message"], "hmac": {"key": WEBHOOK_HMAC_KEY}}])
    yield url
    control.configure(webhooks=[])


@pytest.fixture(scope="module")
def slow_stack(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    """Short dispatch slices (4 s): a lane paced at 1 s per message leases a few messages at a time,
    so a number far down the list is leased (and re-checked) long after the campaign began."""
    with isolated_stack("suppression") as st:
        yield st


def test_mid_campaign_opt_out_via_an_inbound_waha_message(
        slow_stack: IsolatedStack, receiver: str, api_key: str, sandbox_url: str, control: SandboxControl,
        engine: sa.Engine) -> None:
    api = Ops(slow_stack.campaign_channel, api_key)
    sup = Suppressions(slow_stack.campaign_channel, api_key)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip], interval=(1.0, 1.0))
    numbers = phones(12)
    first, last = numbers[0], numbers[-1]
    api.import_phones(camp.id, numbers)
    api.start(camp.id)
    api.wait(camp.id, lambda c: c.sent_count >= 1, timeout=30)  # the first number was messaged
    assert chat_id(first) in {s["chat_id"] for s in control.sends(session=chip.waha_session)}

    # Someone already messaged replies "stop" (case, accents and spaces do not matter); the last
    # number, not messaged yet, replies " Sáir ".
    control.inbound(chip.waha_session, chat_id(first), "stop")
    event = control.inbound(chip.waha_session, digits(last), " Sáir ")
    wait_for(lambda: set(sup.all()) == {digits(first), digits(last)}, 15, lambda: f"suppressions: {sup.all()}")
    listed = {s.phone: s for s in sup.list().suppressions}
    assert listed[digits(last)].source == sps.SUPPRESSION_SOURCE_OPT_OUT
    # A chat that is not an opt-out word changes nothing.
    control.inbound(chip.waha_session, numbers[5], "sair amanhã?")

    done = api.wait_final(camp.id, timeout=60)
    assert done.state == res.CAMPAIGN_STATE_COMPLETED
    assert (done.sent_count, done.skipped_count, done.opted_out_count) == (11, 1, 1)
    msgs = {m.phone: m for m in api.messages(camp.id)}
    assert (msgs[digits(last)].state, msgs[digits(last)].failure_reason) == (res.MESSAGE_STATE_SKIPPED, "OPTED_OUT")
    assert chat_id(last) not in {s["chat_id"] for s in control.sends(session=chip.waha_session)}
    ledger_holds(engine, api_key)
    assert set(sup.all()) == {digits(first), digits(last)}  # "sair amanhã?" is no opt-out

    audit = api.audit.ListAuditEvents(aud.ListAuditEventsRequest(action="suppression.opt_out"), metadata=api.md)
    assert sorted(e.entity_id for e in audit.audit_events) == sorted([digits(first), digits(last)])
    assert {e.actor for e in audit.audit_events} == {"system:dispatcher"}

    # WAHA retries a delivered webhook: applied once (even after the user removed the number).
    sup.stub.RemoveSuppression(sps.RemoveSuppressionRequest(phone=last), metadata=sup.md)
    status, out = post_signed(receiver, event)
    assert (status, out) == (200, {"ok": True, "opted_out": 0, "replies": 0})
    assert digits(last) not in sup.all()


def test_opt_out_confirmation_reply_sent_once_by_the_receiving_chip_in_its_own_pacing(
        api: Ops, sup: Suppressions, sandbox_url: str, control: SandboxControl, receiver: str) -> None:
    text = "Pronto: você não receberá mais mensagens deste número."
    sup.stub.UpdateOptOutSettings(sps.UpdateOptOutSettingsRequest(
        settings=sps.OptOutSettings(confirmation_text=text), update_mask={"paths": ["confirmation_text"]}),
        metadata=sup.md)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(2.0, 2.0))
    camp = api.campaign([chip], interval=(2.0, 2.0))
    api.import_phones(camp.id, phones(1))
    api.start(camp.id)
    assert api.wait_final(camp.id, timeout=30).sent_count == 1  # the chip has just sent
    sent_at = control.sends(session=chip.waha_session)[-1]["ts"]

    who = phones(1)[0]
    event = control.inbound(chip.waha_session, digits(who), "SAIR")
    wait_for(lambda: [s for s in control.sends(session=chip.waha_session) if s["chat_id"] == chat_id(who)], 20,
             "the confirmation reply")
    reply = next(s for s in control.sends(session=chip.waha_session) if s["chat_id"] == chat_id(who))
    assert reply["body"]["text"] == text and reply["path"] == "/api/sendText"
    assert reply["ts"] >= sent_at + 2.0 - 0.05  # a slot of the chip's pacing: its gap after the last send
    assert sup.all() == [digits(who)]

    # WAHA delivers the webhook again: the opt-out is a duplicate, and no second reply is enqueued.
    status, out = post_signed(receiver, event)
    assert (status, out) == (200, {"ok": True, "opted_out": 0, "replies": 0})


def test_opt_out_words_are_configurable_per_user(
        api: Ops, sup: Suppressions, sandbox_url: str, control: SandboxControl, receiver: str) -> None:
    got = sup.stub.GetOptOutSettings(sps.GetOptOutSettingsRequest(), metadata=sup.md)
    assert list(got.words) == ["SAIR", "PARAR", "STOP", "CANCELAR", "DESCADASTRAR"]
    upd = sup.stub.UpdateOptOutSettings(sps.UpdateOptOutSettingsRequest(
        settings=sps.OptOutSettings(words=["Não quero", "remover"]), update_mask={"paths": ["words"]}),
        metadata=sup.md)
    assert list(upd.words) == ["Não quero", "remover"] and upd.HasField("update_time")
    with pytest.raises(grpc.RpcError) as e:
        sup.stub.UpdateOptOutSettings(sps.UpdateOptOutSettingsRequest(settings=sps.OptOutSettings(words=[])),
                                      metadata=sup.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:  # the fuzz found it: NUL was an INTERNAL at the database
        sup.stub.UpdateOptOutSettings(sps.UpdateOptOutSettingsRequest(
            settings=sps.OptOutSettings(words=["ok", "a\x00"])), metadata=sup.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "settings.words[1]" in (e.value.details() or "")
    assert list(sup.stub.GetOptOutSettings(sps.GetOptOutSettingsRequest(), metadata=sup.md).words) == [
        "Não quero", "remover"]
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    a, b = phones(2)
    control.inbound(chip.waha_session, a, "STOP")  # no longer one of this user's words
    control.inbound(chip.waha_session, b, "NAO QUERO")
    wait_for(lambda: sup.all() == [digits(b)], 15, lambda: f"suppressions: {sup.all()}")
    wait_for(lambda: all(w["status"] == 200 for w in control.webhooks() if w["event"] == "message"), 10,
             "the webhooks answered")
    assert sup.all() == [digits(b)]


def test_import_with_malformed_rows_writes_nothing(sup: Suppressions) -> None:
    good = phones(3)
    csv = ("telefone;nota\n" + f"{good[0]};cliente\n" + "\n" + "12ab;x\n" + f"{good[1]};\n").encode()
    with pytest.raises(grpc.RpcError) as e:
        sup.import_(sps.ImportSuppressionsRequest(csv_content=csv[:20]), sps.ImportSuppressionsRequest(
            csv_content=csv[20:], rows=[sps.SuppressionRow(phone=good[2]), sps.SuppressionRow(phone="999")]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "csv_content line 4" in (e.value.details() or "")
    from google.rpc import error_details_pb2, status_pb2  # rich details name every bad row
    st = status_pb2.Status.FromString(dict(e.value.trailing_metadata() or ())["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    next(d for d in st.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["csv_content line 4.phone", "rows[1].phone"]
    assert sup.all() == []

    out = sup.import_(sps.ImportSuppressionsRequest(csv_content=csv.replace(b"12ab;x\n", b"")),
                      sps.ImportSuppressionsRequest(rows=[sps.SuppressionRow(phone=good[2]),
                                                          sps.SuppressionRow(phone=good[0])]))
    assert (out.added, out.already_suppressed, out.total_rows) == (3, 1, 4)
    assert sorted(sup.all()) == sorted(digits(p) for p in good)
    assert {s.phone: s.note for s in sup.list().suppressions}[digits(good[0])] == "cliente"
    with pytest.raises(grpc.RpcError) as e:
        sup.add("not a phone")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_is_paged_and_searchable(sup: Suppressions) -> None:
    numbers = [f"+55 21 9{7000_0000 + i:08d}" for i in range(25)] + ["+55 11 98888 0001", "+1 650 253 0000"]
    sup.import_(sps.ImportSuppressionsRequest(rows=[sps.SuppressionRow(phone=p) for p in numbers]))
    pages: list[list[str]] = []
    token = ""
    while True:
        page = sup.list(page_size=10, token=token)
        pages.append([s.phone for s in page.suppressions])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 7]
    flat = [p for page in pages for p in page]
    assert flat == sorted(digits(p) for p in numbers)
    assert sup.all("5521") == sorted(digits(p) for p in numbers[:25])  # a prefix
    assert sup.all("8888") == ["5511988880001"]  # a substring
    assert sup.all("+1 (650)") == ["16502530000"]  # formatting ignored
    with pytest.raises(grpc.RpcError) as e:
        sup.list(query="5521", token=sup.list(page_size=10).next_page_token)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # a token of another search
    sup.stub.RemoveSuppression(sps.RemoveSuppressionRequest(phone=numbers[-1]), metadata=sup.md)
    assert sup.all("650253") == []
    with pytest.raises(grpc.RpcError) as e:
        sup.stub.RemoveSuppression(sps.RemoveSuppressionRequest(phone=numbers[-1]), metadata=sup.md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_tenancy_user_b_sees_nothing_of_user_a(
        sup: Suppressions, campaign_channel: grpc.Channel, create_user: Callable[..., str]) -> None:
    a = phones(1)[0]
    sup.add(a)
    other = Suppressions(campaign_channel, create_user())
    assert other.all() == [] and other.all(digits(a)) == []
    with pytest.raises(grpc.RpcError) as e:
        other.stub.RemoveSuppression(sps.RemoveSuppressionRequest(phone=a), metadata=other.md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert sup.all() == [digits(a)]
    with pytest.raises(grpc.RpcError) as e:
        sup.stub.ListSuppressions(sps.ListSuppressionsRequest(), metadata=(("authorization", "Bearer nope"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_receiver_refuses_unsigned_and_malformed_message_webhooks(receiver: str) -> None:
    event = {"id": "evt_1", "timestamp": 1700000000000, "session": "s-nobody", "engine": "GOWS", "event": "message",
             "payload": {"id": "false_5511999990001@c.us_3EB0AAAA", "from": "5511999990001@c.us", "fromMe": False,
                         "body": "SAIR"}}
    assert post_signed(receiver, event, key=None)[0] == 401
    assert post_signed(receiver, event, key="wrong key")[0] == 401
    assert post_signed(receiver, None, raw=b"{not json")[0] == 400
    for broken in ({**event, "payload": "SAIR"}, {**event, "session": None},
                   {**event, "payload": {**event["payload"], "from": 5511}},  # type: ignore[dict-item]
                   {**event, "payload": {**event["payload"], "id": ""}},  # type: ignore[dict-item]
                   {**event, "payload": {**event["payload"], "body": ["SAIR"]}}):  # type: ignore[dict-item]
        status, _ = post_signed(receiver, broken)
        assert status == 400, broken
    assert post_signed(receiver, event) == (200, {"ok": True, "opted_out": 0, "replies": 0})  # no chip on that session
    own = {**event, "payload": {**event["payload"], "fromMe": True}}  # type: ignore[dict-item]
    assert post_signed(receiver, own)[1] == {"ignored": "not an inbound text message"}
