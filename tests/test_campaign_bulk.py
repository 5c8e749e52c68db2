"""Big campaigns, on a stack whose thresholds make 10 rows "big":
- StartCampaign writes the messages of a campaign of WHAGO_START_PARALLEL_MIN contacts or more over
  several connections (ops/start_messages.py): still one message per contact, in order, round-robin;
- DeleteCampaign of over WHAGO_DELETE_INLINE_ROWS contacts + messages: the campaign is gone at once,
  its rows are purged in the background (campaign_service/sweeps.py), counts exact;
- CancelCampaign of over WHAGO_CANCEL_INLINE_ROWS open and failed messages: CANCELLED at once with
  exact counts and credits, leased messages failed in the call, PENDING ones by the sweep after."""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from campaign_service.db.engine import Database
from campaign_service.ops.inputs import CANCEL_REASON
from campaign_service.repository import cancel_sweeps
from campaign_service.repository import purges as purges_repo
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import BALANCE_SQL, UNFOLDED_ELSEWHERE_SQL, Api, phones, user_id, wait_for
from tests.test_campaign_support import SLOW, engine  # noqa: F401 - fixtures
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

SENDING = res.MESSAGE_STATE_SENDING


def rows_of(engine: sa.Engine, campaign_id: str) -> tuple[int, int, int]:  # noqa: F811
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(  # type: ignore[return-value]
            "SELECT (SELECT count(*) FROM campaign_messages WHERE campaign_id = :c),"
            " (SELECT count(*) FROM campaign_contacts WHERE campaign_id = :c),"
            " (SELECT count(*) FROM campaign_purges WHERE campaign_id = :c)"), {"c": campaign_id}).one())


@pytest.fixture(scope="module")
def purging(isolated_stack: Callable[..., Any], sandbox_url: str) -> Iterator[Any]:
    """A stack whose campaign_service starts campaigns of 10 contacts or more over 3 connections and
    purges any campaign of more than 10 rows in the background."""
    with isolated_stack("bulk", workers=0, WHAGO_DELETE_INLINE_ROWS="10", WHAGO_CANCEL_INLINE_ROWS="10",
                        WHAGO_START_PARALLEL_MIN="10", WHAGO_START_PARALLEL="3") as st:
        yield st


def test_big_delete_is_not_found_at_once_and_purged_after(purging: Any, create_user: Callable[..., str],
                                                          engine: sa.Engine, sandbox_url: str) -> None:  # noqa: F811
    api = Api(purging.campaign_channel, create_user())
    chips = [api.chip(sandbox_url, SANDBOX_API_KEY, interval=SLOW) for _ in range(2)]
    c = api.campaign(chips, name="big", interval=SLOW)
    assert api.import_phones(c.id, phones(25)).imported_count == 25
    api.start(c.id)
    api.cancel(c.id)
    out = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=c.id), metadata=api.md)
    assert (out.deleted_contacts, out.deleted_messages) == (25, 25)
    with pytest.raises(grpc.RpcError) as err:
        api.get(c.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert c.id not in {x.id for x in api.campaigns.ListCampaigns(
        cs.ListCampaignsRequest(page_size=100), metadata=api.md).campaigns}
    with pytest.raises(grpc.RpcError) as err:
        api.start(c.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while rows_of(engine, c.id) != (0, 0, 0):
        assert time.monotonic() < deadline, rows_of(engine, c.id)
        time.sleep(0.1)
    want = f"25 messages deleted from campaign {c.id} (removed in the background)"
    for _ in range(50):
        if want in purging.campaign.tail(400):
            break
        time.sleep(0.1)
    assert want in purging.campaign.tail(400)


def message_states(engine: sa.Engine, campaign_id: str) -> collections.Counter[tuple[int, str | None]]:  # noqa: F811
    with engine.connect() as conn:
        return collections.Counter((int(st), r) for st, r in conn.execute(sa.text(
            "SELECT state, failure_reason FROM campaign_messages WHERE campaign_id = :c"), {"c": campaign_id}))


def test_big_cancel_fails_leased_messages_in_the_call_and_pending_ones_after(
        purging: Any, create_user: Callable[..., str], engine: sa.Engine, sandbox_url: str) -> None:  # noqa: F811
    key = create_user()
    api = Api(purging.campaign_channel, key)
    uid = user_id(engine, key)
    with engine.connect() as conn:
        before = conn.execute(sa.text(BALANCE_SQL), {"u": uid}).one()
    chips = [api.chip(sandbox_url, SANDBOX_API_KEY, interval=SLOW) for _ in range(2)]
    c = api.campaign(chips, name="big cancel", interval=SLOW)
    assert api.import_phones(c.id, phones(30)).imported_count == 30
    api.start(c.id)  # no worker on this stack: nothing leases, so 3 leases are written here
    with engine.begin() as conn:
        conn.execute(sa.text(
            f"UPDATE campaign_messages SET state = {SENDING}, lease_owner = 'lane-x',"
            " lease_expires_at = now() + interval '60 seconds' WHERE id IN (SELECT id FROM campaign_messages"
            " WHERE campaign_id = :c ORDER BY seq LIMIT 3)"), {"c": c.id})
    done = api.cancel(c.id)
    assert done.state == res.CAMPAIGN_STATE_CANCELLED and done.failed_count == 30
    # In the call: the leased ones (a late report may still name them), and the credits of all 30.
    assert not {k: v for k, v in message_states(engine, c.id).items() if k[0] == SENDING}
    with engine.connect() as conn:
        assert tuple(conn.execute(sa.text(BALANCE_SQL), {"u": uid}).one()) == tuple(before)
        assert conn.execute(sa.text(UNFOLDED_ELSEWHERE_SQL), {"u": uid}).scalar_one() == 0
    said = f"campaign={c.id} CANCELLED (30 messages failed, 27 of them by the sweep after, 30 credits refunded)"
    wait_for(lambda: said in purging.campaign.tail(400), timeout=10, what="the Cancel's log line")
    failed = (res.MESSAGE_STATE_FAILED, CANCEL_REASON)
    wait_for(lambda: message_states(engine, c.id) == {failed: 30}, timeout=30,
             what=lambda: f"every message FAILED by the sweep: {message_states(engine, c.id)}")
    with engine.connect() as conn:
        wait_for(lambda: conn.execute(sa.text("SELECT count(*) FROM campaign_cancel_sweeps WHERE campaign_id = :c"),
                                      {"c": c.id}).scalar_one() == 0, timeout=10, what="the sweep's queue entry gone")
    assert api.get(c.id).failed_count == 30


def test_cancel_sweep_walks_pending_ids_upwards_in_bounded_batches(
        database_url: str, engine: sa.Engine, create_user: Callable[..., str]) -> None:  # noqa: F811
    """12 PENDING messages of a cancelled campaign (2 of them already SENT: a late truth stays),
    swept 5 at a time: 5, 5, then 0 left and done. One transaction holds the queue row, so the
    servers' sweepers skip it meanwhile."""
    cid, uid = uuid.uuid4(), user_id(engine, create_user())
    db = Database(database_url, pool_size=1)
    try:
        with db.transaction() as s:
            s.execute(sa.text("INSERT INTO campaigns (id, user_id, name, state) VALUES (:c, :u, 'swept', :st)"),
                      {"c": cid, "u": uid, "st": res.CAMPAIGN_STATE_CANCELLED})
            s.execute(sa.text("INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, seq, state)"
                              " SELECT :c, g, :c, g, CASE WHEN g IN (4, 9) THEN :sent ELSE :p END"
                              " FROM generate_series(1, 12) g"),
                      {"c": cid, "sent": res.MESSAGE_STATE_SENT, "p": res.MESSAGE_STATE_PENDING})
            cancel_sweeps.queue(s, cid, "swept")
            steps = []
            while (step := cancel_sweeps.sweep_batch(s, 5)) is not None:
                if step.campaign_id != cid:  # another test's queued campaign: not ours to look at
                    continue
                steps.append((step.rows, step.done))
                if step.done:
                    break
            assert steps == [(5, False), (5, False), (0, True)]
            got = collections.Counter(s.execute(sa.text(
                "SELECT state, failure_reason FROM campaign_messages WHERE campaign_id = :c"), {"c": cid}).all())
            assert got == {(res.MESSAGE_STATE_FAILED, "swept"): 10, (res.MESSAGE_STATE_SENT, None): 2}
            s.rollback()
    finally:
        db.dispose()


def test_small_delete_stays_in_the_transaction(purging: Any, create_user: Callable[..., str],
                                               engine: sa.Engine, sandbox_url: str) -> None:  # noqa: F811
    api = Api(purging.campaign_channel, create_user())
    c = api.campaign([], name="small", interval=SLOW)
    assert api.import_phones(c.id, phones(4)).imported_count == 4  # 4 rows <= 10: deleted inline
    out = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=c.id), metadata=api.md)
    assert (out.deleted_contacts, out.deleted_messages) == (4, 0)
    assert rows_of(engine, c.id) == (0, 0, 0)


def test_purge_batch_removes_a_bounded_batch_and_then_the_queue_entry(database_url: str,
                                                                      engine: sa.Engine) -> None:  # noqa: F811
    """Rows of a campaign id with no campaign row (what a Delete leaves), 12 messages and 5 contacts,
    purged 7 rows at a time: 7 messages, 5 messages + 2 contacts, 3 contacts and done. One
    transaction holds the queue row, so the servers' sweepers skip it meanwhile."""
    cid = uuid.uuid4()
    db = Database(database_url, pool_size=1)
    try:
        with db.transaction() as s:
            purges_repo.queue(s, cid)
            s.execute(sa.text("INSERT INTO campaign_contacts (campaign_id, phone, chat_id, row_no)"
                              " SELECT :c, '5511' || g, '5511' || g || '@c.us', g FROM generate_series(1, 5) g"),
                      {"c": cid})
            s.execute(sa.text("INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, seq)"
                              " SELECT :c, g, :c, g FROM generate_series(1, 12) g"), {"c": cid})
            steps = []
            while (step := purges_repo.purge_batch(s, 7)) is not None:
                if step.campaign_id != cid:  # another test's queued campaign: not ours to look at
                    continue
                steps.append((step.messages, step.contacts, step.done))
                if step.done:
                    break
        assert steps == [(7, 0, False), (5, 2, False), (0, 3, True)]
        assert rows_of(engine, str(cid)) == (0, 0, 0)
    finally:
        db.dispose()


def test_delete_of_a_big_draft_counts_its_contacts(purging: Any, create_user: Callable[..., str],
                                                   engine: sa.Engine) -> None:  # noqa: F811
    api = Api(purging.campaign_channel, create_user())
    c = api.campaign([], name="draft", interval=SLOW)
    assert api.import_phones(c.id, phones(12)).imported_count == 12
    out = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=c.id), metadata=api.md)
    assert (out.deleted_contacts, out.deleted_messages) == (12, 0)
    assert api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=10), metadata=api.md).campaigns == []
    deadline = time.monotonic() + 30
    while rows_of(engine, c.id) != (0, 0, 0):
        assert time.monotonic() < deadline, rows_of(engine, c.id)
        time.sleep(0.1)


def messages_by_seq(engine: sa.Engine, campaign_id: str) -> list[tuple[int, int, str]]:  # noqa: F811
    """(seq, contact row_no, chip id) of each message, in send order."""
    with engine.connect() as conn:
        return [(int(a), int(b), str(c)) for a, b, c in conn.execute(sa.text(
            "SELECT m.seq, ct.row_no, m.chip_id FROM campaign_messages m JOIN campaign_contacts ct"
            " ON ct.id = m.contact_id WHERE m.campaign_id = :c ORDER BY m.seq"), {"c": campaign_id})]


@pytest.mark.parametrize("shuffle", [False, True])
def test_parallel_start_makes_one_message_per_contact_in_order_round_robin(
        purging: Any, create_user: Callable[..., str], engine: sa.Engine, sandbox_url: str,  # noqa: F811
        shuffle: bool) -> None:
    api = Api(purging.campaign_channel, create_user())
    chips = [api.chip(sandbox_url, SANDBOX_API_KEY, interval=SLOW) for _ in range(3)]
    settings = res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=3600, interval_max_seconds=3600),
                                    shuffle_contacts=shuffle, verify_numbers=False)
    c = api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name=f"parallel shuffle={shuffle}", templates=[res.MessageTemplate(text="hi")], settings=settings,
        chip_ids=[ch.id for ch in chips])), metadata=api.md)
    assert api.import_phones(c.id, phones(40)).imported_count == 40
    # A leftover of a Start interrupted after its slices committed: the next Start clears it.
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, seq)"
                             " SELECT campaign_id, id, :chip, 1 FROM campaign_contacts WHERE campaign_id = :c LIMIT 3"),
                     {"c": c.id, "chip": chips[0].id})
    shown = api.campaigns.ListCampaignMessages(cs.ListCampaignMessagesRequest(campaign_id=c.id), metadata=api.md)
    assert list(shown.messages) == []  # a campaign not started has no messages to show
    started = api.start(c.id)
    assert (started.state, started.pending_count) == (res.CAMPAIGN_STATE_RUNNING, 40)
    rows = messages_by_seq(engine, c.id)
    assert [seq for seq, _, _ in rows] == list(range(1, 41))
    assert sorted(row_no for _, row_no, _ in rows) == list(range(1, 41))
    if shuffle:
        assert [row_no for _, row_no, _ in rows] != list(range(1, 41))
    else:
        assert [row_no for _, row_no, _ in rows] == list(range(1, 41))
    order = [chip for _, _, chip in rows[:3]]
    assert sorted(order) == sorted(ch.id for ch in chips)
    assert [chip for _, _, chip in rows] == [order[k % 3] for k in range(40)]
    api.cancel(c.id)
