# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""The credit ledger (issue 14): Start reserves one credit per message, a sent message consumes it,
cancelled, failed and skipped messages release it; GetCreditBalance, ListCreditTransactions, admin
grants. After every scenario the invariant is checked on one database snapshot:

    available = GRANT - RESERVE + RELEASE  >= 0
    reserved  = RESERVE - CONSUME - RELEASE = the user's PENDING/SENDING messages

where both are the users row's counters plus what the user's RUNNING/PAUSED campaigns settled since
(campaigns.credits_consumed_unfolded / credits_released_unfolded, folded into the users row when a
campaign ends: reports of a running campaign never lock the users row).
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import sqlalchemy as sa
from alembic import command
from whago_client import WhagoClient
from whago_client.cli import main as cli_main

from campaign_service import admin
from campaign_service.db.migrate import alembic_config, upgrade
from devstack.servers import Postgres
from tests.conftest import SANDBOX_API_KEY, SERVICE_TOKEN
from tests.helpers import BALANCE_SQL, UNFOLDED_ELSEWHERE_SQL, Ops, phones, user_id, wait_for
from tests.test_campaign_support import engine, fails, slow_chip  # noqa: F401 - fixtures
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import credit_service_pb2_grpc as crs_grpc
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dpb_grpc
from whago.campaign.v1 import resources_pb2 as res

GRANT, RESERVE, CONSUME, RELEASE = (crs.CREDIT_TRANSACTION_KIND_GRANT, crs.CREDIT_TRANSACTION_KIND_RESERVE,
                                    crs.CREDIT_TRANSACTION_KIND_CONSUME, crs.CREDIT_TRANSACTION_KIND_RELEASE)
FAST = (0.0, 0.0)


@dataclass(frozen=True)
class Ledger:
    available: int
    reserved: int
    grants: int
    reserves: int
    consumes: int
    releases: int
    open_messages: int
    paid_messages: int  # SENT, DELIVERED or READ: equals `consumes` for a user who began with the ledger


def check_invariant(engine: sa.Engine, uid: uuid.UUID) -> Ledger:
    """The invariant, read in ONE snapshot (REPEATABLE READ): lanes may be reporting meanwhile, and
    a ledger entry commits together with the message states it accounts for."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        available, reserved = conn.execute(sa.text(BALANCE_SQL), {"u": uid}).one()
        unfolded_elsewhere = conn.execute(sa.text(UNFOLDED_ELSEWHERE_SQL), {"u": uid}).scalar_one()
        s = conn.execute(sa.text(f"""
            SELECT COALESCE(sum(amount) FILTER (WHERE kind = {GRANT}), 0) AS g,
                   COALESCE(sum(amount) FILTER (WHERE kind = {RESERVE}), 0) AS r,
                   COALESCE(sum(amount) FILTER (WHERE kind = {CONSUME}), 0) AS c,
                   COALESCE(sum(amount) FILTER (WHERE kind = {RELEASE}), 0) AS l,
                   count(*) FILTER (WHERE kind <> {GRANT} AND amount <= 0) AS bad
            FROM credit_transactions WHERE user_id = :u"""), {"u": uid}).one()
        m = conn.execute(sa.text("""
            SELECT count(*) FILTER (WHERE m.state IN (1, 2)) AS open,
                   count(*) FILTER (WHERE m.state IN (3, 4, 5)) AS paid
            FROM campaign_messages m JOIN campaigns c ON c.id = m.campaign_id WHERE c.user_id = :u"""),
            {"u": uid}).one()
    led = Ledger(available, reserved, s.g, s.r, s.c, s.l, m.open, m.paid)
    assert unfolded_elsewhere == 0, f"a campaign out of RUNNING/PAUSED kept consumed credits unfolded: {led}"
    assert s.bad == 0, f"a RESERVE/CONSUME/RELEASE entry with amount <= 0: {led}"
    assert led.available == led.grants - led.reserves + led.releases, led
    assert led.reserved == led.reserves - led.consumes - led.releases, led
    assert led.available >= 0 and led.reserved >= 0, led
    assert led.reserved == led.open_messages, led
    return led


def check_fresh_user(engine: sa.Engine, uid: uuid.UUID, granted: int) -> Ledger:
    """The invariant, and for a user created with the ledger: every sent message consumed a credit."""
    led = check_invariant(engine, uid)
    assert led.grants == granted and led.consumes == led.paid_messages, led
    return led


class Credits:
    """CreditService stubs bound to one user's key."""

    def __init__(self, channel: grpc.Channel, key: str) -> None:
        self.stub = crs_grpc.CreditServiceStub(channel)
        self.md = (("authorization", f"Bearer {key}"),)

    def balance(self) -> crs.CreditBalance:
        return self.stub.GetCreditBalance(crs.GetCreditBalanceRequest(), metadata=self.md)

    def page(self, **kw: object) -> crs.ListCreditTransactionsResponse:
        return self.stub.ListCreditTransactions(crs.ListCreditTransactionsRequest(**kw), metadata=self.md)  # type: ignore[arg-type]

    def all(self, **kw: object) -> list[crs.CreditTransaction]:
        out: list[crs.CreditTransaction] = []
        token = ""
        while True:
            p = self.page(page_size=1000, page_token=token, **kw)
            out += p.transactions
            token = p.next_page_token
            if not token:
                return out


@dataclass
class User:
    key: str
    id: uuid.UUID
    api: Ops
    credits: Credits


@pytest.fixture()
def make_user(stack: object, campaign_channel: grpc.Channel, create_user: Callable[..., str],
              engine: sa.Engine) -> Callable[[int], User]:
    def make(credits: int) -> User:
        key = create_user(credits=credits)
        return User(key, user_id(engine, key), Ops(campaign_channel, key), Credits(campaign_channel, key))
    return make


def run_admin(database_url: str, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("DATABASE_URL", database_url)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = admin.main(list(argv))
    return rc, buf.getvalue()


def test_start_then_complete_consumes_one_credit_per_sent_message(
        make_user: Callable[[int], User], engine: sa.Engine, sandbox_url: str) -> None:
    u = make_user(100)
    assert (u.credits.balance().available, u.credits.balance().reserved) == (100, 0)
    chip = u.api.chip(sandbox_url, SANDBOX_API_KEY, interval=FAST)
    camp = u.api.campaign([chip])
    u.api.start_sending(camp.id, 5)
    check_invariant(engine, u.id)  # mid-campaign, whatever the lane has reported so far
    done = u.api.wait_final(camp.id)
    assert done.state == res.CAMPAIGN_STATE_COMPLETED and done.sent_count == 5

    led = check_fresh_user(engine, u.id, 100)
    assert (led.available, led.reserved, led.consumes, led.releases) == (95, 0, 5, 0)
    b = u.credits.balance()
    assert (b.available, b.reserved) == (95, 0)
    entries = u.credits.all(campaign_id=camp.id)
    reserves = [t for t in entries if t.kind == RESERVE]
    assert [t.amount for t in reserves] == [5]  # one entry for the whole Start
    assert sum(t.amount for t in entries if t.kind == CONSUME) == 5
    assert all(t.campaign_id == camp.id and t.create_time.seconds > 0 for t in entries)


def test_cancel_releases_the_unsent_messages_in_one_entry(
        make_user: Callable[[int], User], engine: sa.Engine, sandbox_url: str) -> None:
    u = make_user(50)
    camp = u.api.campaign([slow_chip(u.api, sandbox_url), slow_chip(u.api, sandbox_url)], interval=(3600, 3600))
    u.api.start_sending(camp.id, 8)
    led = check_invariant(engine, u.id)
    assert led.reserves == 8 and led.available == 42
    done = u.api.cancel(camp.id)
    assert done.state == res.CAMPAIGN_STATE_CANCELLED

    # A send in flight at the Cancel may be reported SENT after it (then charged again): compare
    # with the ledger's own consumption, and the Cancel's entry with the Cancel's response.
    led = check_fresh_user(engine, u.id, 50)
    assert led.reserved == 0 and led.available == 50 - led.consumes
    releases = u.credits.all(campaign_id=camp.id, kind=RELEASE)
    assert [t.amount for t in releases] == [8 - done.sent_count]
    assert "cancelled" in releases[0].description


def test_failed_and_skipped_messages_release_their_credit(
        make_user: Callable[[int], User], engine: sa.Engine, sandbox_url: str, campaign_channel: grpc.Channel,
        stack: object) -> None:
    """Reports through the real internal DeliveryService, the dispatcher's way in (service token), on a
    paused campaign so that no lane reports meanwhile: one call = one CONSUME and one RELEASE entry."""
    u = make_user(20)
    camp = u.api.campaign([slow_chip(u.api, sandbox_url)], interval=(3600, 3600))
    u.api.start_sending(camp.id, 8)
    u.api.pause(camp.id)
    wait_for(lambda: all(m.state != res.MESSAGE_STATE_SENDING for m in u.api.messages(camp.id)), 30,
             "the paused campaign's leases released (or their sends reported)")
    pending = [m.id for m in u.api.messages(camp.id) if m.state == res.MESSAGE_STATE_PENDING]
    before = {t.id for t in u.credits.all()}
    sent_before = check_invariant(engine, u.id).consumes

    delivery = dpb_grpc.DeliveryServiceStub(campaign_channel)
    token = (("authorization", f"Bearer {SERVICE_TOKEN}"),)

    def report(*items: tuple[str, int]) -> None:
        delivery.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=camp.id, reports=[
            dpb.DeliveryReport(message_id=mid, outcome=o, waha_message_id=f"w-{mid}", failure_reason="test")  # type: ignore[arg-type]
            for mid, o in items]), metadata=token, timeout=10)

    report((pending[0], dpb.DELIVERY_OUTCOME_SENT), (pending[1], dpb.DELIVERY_OUTCOME_FAILED),
           (pending[2], dpb.DELIVERY_OUTCOME_SKIPPED), (pending[3], dpb.DELIVERY_OUTCOME_SKIPPED),
           (pending[4], dpb.DELIVERY_OUTCOME_UNKNOWN))
    new = [t for t in u.credits.all() if t.id not in before]
    assert sorted((t.kind, t.amount) for t in new) == [(CONSUME, 1), (RELEASE, 4)]
    rel = next(t for t in new if t.kind == RELEASE)
    assert "2 failed" in rel.description and "2 skipped" in rel.description
    led = check_invariant(engine, u.id)
    assert led.consumes == sent_before + 1

    # The truth wins: a FAILED message later reported sent is charged again (RESERVE + CONSUME).
    available = led.available
    report((pending[1], dpb.DELIVERY_OUTCOME_SENT))
    led = check_invariant(engine, u.id)
    assert led.available == available - 1
    # Duplicates change nothing.
    report((pending[0], dpb.DELIVERY_OUTCOME_SENT), (pending[2], dpb.DELIVERY_OUTCOME_SKIPPED))
    assert check_invariant(engine, u.id) == led

    u.api.cancel(camp.id)
    led = check_fresh_user(engine, u.id, 20)
    assert led.reserved == 0 and led.available == 20 - led.consumes


def test_messages_failed_by_whatsapp_release_their_credit(
        make_user: Callable[[int], User], engine: sa.Engine, sandbox_url: str, control: SandboxControl) -> None:
    u = make_user(30)
    chip = u.api.chip(sandbox_url, SANDBOX_API_KEY, interval=FAST)
    control.set_session(chip.waha_session, fail_next=[{"status": 400, "count": 2}])
    camp = u.api.campaign([chip])
    u.api.start_sending(camp.id, 6)
    done = u.api.wait_final(camp.id)
    assert done.state == res.CAMPAIGN_STATE_COMPLETED and (done.sent_count, done.failed_count) == (4, 2)
    led = check_fresh_user(engine, u.id, 30)
    assert (led.available, led.reserved, led.consumes, led.releases) == (26, 0, 4, 2)


def test_parallel_starts_beyond_the_balance_exactly_the_affordable_ones_succeed(
        make_user: Callable[[int], User], engine: sa.Engine, sandbox_url: str) -> None:
    u = make_user(10)
    chip = slow_chip(u.api, sandbox_url)
    camps = []
    for i in range(8):
        c = u.api.campaign([chip], name=f"parallel {i}", interval=(3600, 3600))
        u.api.import_phones(c.id, phones(3))
        camps.append(c)
    barrier = threading.Barrier(len(camps))

    def start(cid: str) -> str:
        barrier.wait(timeout=30)
        try:
            u.api.start(cid)
            return "ok"
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]

    with ThreadPoolExecutor(len(camps)) as pool:
        outcomes = list(pool.map(start, [c.id for c in camps]))
    ok = [c for c, o in zip(camps, outcomes, strict=True) if o == "ok"]
    refused = [o for o in outcomes if o != "ok"]
    assert len(ok) == 3, outcomes  # 3 x 3 credits of 10
    assert all(o.startswith("FAILED_PRECONDITION") and "credits" in o for o in refused), refused
    led = check_invariant(engine, u.id)
    assert (led.reserves, led.available) == (9, 1)
    for c, o in zip(camps, outcomes, strict=True):
        if o != "ok":
            got = u.api.get(c.id)
            assert got.state == res.CAMPAIGN_STATE_DRAFT and got.pending_count == 0
    assert [t.amount for t in u.credits.all(kind=RESERVE)] == [3, 3, 3]
    for c in ok:
        u.api.cancel(c.id)
    led = check_fresh_user(engine, u.id, 10)
    assert led.reserved == 0 and led.available == 10 - led.consumes


def test_admin_grants_and_removals_go_through_the_ledger(
        make_user: Callable[[int], User], engine: sa.Engine, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    u = make_user(7)
    assert [(t.kind, t.amount) for t in u.credits.all()] == [(GRANT, 7)]
    rc, out = run_admin(database_url, monkeypatch, "add-credits", "--user-id", str(u.id), "--credits", "50",
                        "--description", "top-up")
    assert rc == 0 and out.strip() == "57"
    rc, out = run_admin(database_url, monkeypatch, "add-credits", "--user-id", str(u.id), "--credits", "-20")
    assert rc == 0 and out.strip() == "37"
    rc, _ = run_admin(database_url, monkeypatch, "add-credits", "--user-id", str(u.id), "--credits", "-38")
    assert rc == 1  # never below zero; nothing written
    rc, _ = run_admin(database_url, monkeypatch, "add-credits", "--user-id", str(uuid.uuid4()), "--credits", "5")
    assert rc == 1
    entries = u.credits.all()
    assert [(t.kind, t.amount, t.description) for t in entries] == [
        (GRANT, -20, "credits removed"), (GRANT, 50, "top-up"), (GRANT, 7, "initial credits")]
    assert all(t.campaign_id == "" for t in entries)
    b = u.credits.balance()
    assert (b.available, b.reserved) == (37, 0)
    check_invariant(engine, u.id)

    zero = make_user(0)
    assert zero.credits.all() == [] and zero.credits.balance().available == 0
    check_invariant(engine, zero.id)


def test_list_credit_transactions_pages_filters_and_tenancy(
        make_user: Callable[[int], User], engine: sa.Engine, database_url: str, monkeypatch: pytest.MonkeyPatch,
        campaign_channel: grpc.Channel) -> None:
    u = make_user(1)
    for n in range(2, 7):
        assert run_admin(database_url, monkeypatch, "add-credits", "--user-id", str(u.id), "--credits", str(n))[0] == 0
    p1 = u.credits.page(page_size=2)
    p2 = u.credits.page(page_size=2, page_token=p1.next_page_token)
    p3 = u.credits.page(page_size=2, page_token=p2.next_page_token)
    amounts = [t.amount for p in (p1, p2, p3) for t in p.transactions]
    assert amounts == [6, 5, 4, 3, 2, 1] and p3.next_page_token == ""
    ids = [int(t.id) for p in (p1, p2, p3) for t in p.transactions]
    assert ids == sorted(ids, reverse=True)

    f = fails(u.credits.page, page_size=2, page_token=p1.next_page_token, kind=RELEASE)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["page_token"]
    f = fails(u.credits.page, kind=99)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["kind"]
    f = fails(u.credits.page, campaign_id="nope")
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["campaign_id"]
    f = fails(u.credits.page, page_size=-1)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["page_size"]
    assert u.credits.page(kind=RESERVE).transactions == []

    other = make_user(3)
    assert [t.amount for t in other.credits.all()] == [3]  # never another user's entries
    assert other.credits.balance().available == 3
    anonymous = crs_grpc.CreditServiceStub(campaign_channel)
    f = fails(anonymous.GetCreditBalance, crs.GetCreditBalanceRequest())
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    f = fails(anonymous.ListCreditTransactions, crs.ListCreditTransactionsRequest(),
              metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    check_invariant(engine, u.id)


def test_sdk_and_cli(make_user: Callable[[int], User], engine: sa.Engine, sandbox_url: str,
                     ports: dict[str, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                     ) -> None:
    u = make_user(40)
    camp = u.api.campaign([slow_chip(u.api, sandbox_url)], interval=(3600, 3600))
    u.api.start_sending(camp.id, 4)
    u.api.cancel(camp.id)
    # A send that raced the Cancel went out before it returned, but its report (SENDING -> SENT, a
    # RESERVE and CONSUME of 1) may land after: read the balance once no message is in flight.
    wait_for(lambda: all(m.state not in (res.MESSAGE_STATE_PENDING, res.MESSAGE_STATE_SENDING)
                         for m in u.api.messages(camp.id)), 30, "the raced send's report")
    target = f"127.0.0.1:{ports['campaign']}"
    with WhagoClient(target, api_key=u.key) as client:
        b = client.get_credit_balance()
        assert b.reserved == 0 and b.available == 40 - check_fresh_user(engine, u.id, 40).consumes
        kinds = [t.kind for t in client.list_credit_transactions(page_size=1)]
        assert kinds[-1] == GRANT and RESERVE in kinds and RELEASE in kinds
        # Start's reservation is the oldest; a send that raced the Cancel may add a RESERVE of 1 after it.
        reserves = [t.amount for t in client.list_credit_transactions(campaign_id=camp.id, kind="reserve")]
        assert reserves[-1] == 4 and all(a == 1 for a in reserves[:-1])

    monkeypatch.setenv("WHAGO_TARGET", target)
    monkeypatch.setenv("WHAGO_API_KEY", u.key)
    with WhagoClient(target, api_key=u.key) as client:
        before = client.get_credit_balance().available
        assert cli_main(["credits"]) == 0
        after = client.get_credit_balance().available
    out = capsys.readouterr().out
    # A send that raced the Cancel may still be charged while this runs: the CLI shows a balance
    # read between the two.
    assert "AVAILABLE" in out and (str(before) in out or str(after) in out), (before, after, out)
    assert cli_main(["--json", "credits", "transactions", "--kind", "GRANT"]) == 0
    out = capsys.readouterr().out
    assert '"CREDIT_TRANSACTION_KIND_GRANT"' in out and '"40"' in out
    check_invariant(engine, u.id)


def test_migration_opens_the_ledger_of_an_existing_database(postgres: Postgres) -> None:
    """Before 0007 a Start debited users.credits; after it, the same database satisfies the invariant:
    a GRANT of balance + open messages, a RESERVE per campaign with open messages."""
    postgres.create_database("whago_ledger_migration")
    url = postgres.url("whago_ledger_migration")
    command.upgrade(alembic_config(url), "0005")
    eng = sa.create_engine(url)
    try:
        rich, poor = uuid.uuid4(), uuid.uuid4()
        camp = uuid.uuid4()
        with eng.begin() as conn:
            conn.execute(sa.text("INSERT INTO users (id, name, api_key_hash, credits) VALUES"
                                 " (:a, 'rich', 'h1', 40), (:b, 'poor', 'h2', 0)"), {"a": rich, "b": poor})
            conn.execute(sa.text("INSERT INTO campaigns (id, user_id, name, state) VALUES (:c, :u, 'old', 3)"),
                         {"c": camp, "u": rich})
            conn.execute(sa.text("""
                INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, state, seq)
                SELECT :c, g, :chip, s, g FROM unnest(ARRAY[1, 1, 2, 3, 6]) WITH ORDINALITY AS t(s, g)"""),
                         {"c": camp, "chip": uuid.uuid4()})
        upgrade(url)
        led = check_invariant(eng, rich)
        assert (led.available, led.reserved, led.grants, led.reserves) == (40, 3, 43, 3)
        assert check_invariant(eng, poor) == Ledger(0, 0, 0, 0, 0, 0, 0, 0)
        command.downgrade(alembic_config(url), "0005")
        upgrade(url)
        assert check_invariant(eng, rich) == led
    finally:
        eng.dispose()
