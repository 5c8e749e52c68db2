# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""Every row of DESIGN.md's lifecycle table, allowed and refused, against the real services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2

from campaign_service.states import CreditKind
from tests.helpers import Api, key_hash, phones
from tests.test_campaign_support import (  # noqa: F401 - fixtures
    api,
    cancelled,
    completed,
    count,
    draft,
    engine,
    fails,
    live,
    paused,
    row,
    running,
    scheduled,
    slow_chip,
)
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

STATES = ("DRAFT", "SCHEDULED", "RUNNING", "PAUSED", "CANCELLED", "COMPLETED")
DELETE_MESSAGE = "cancel the campaign before deleting it"


def in_state(state: str, api: Api, engine: sa.Engine, url: str) -> res.Campaign:
    """A campaign of the caller in `state`, with contacts and a chip (so Start could succeed)."""
    if state == "DRAFT":
        return draft(api, [slow_chip(api, url)], contacts=4)
    if state == "SCHEDULED":
        c = draft(api, [slow_chip(api, url)], contacts=4)
        ts = timestamp_pb2.Timestamp()
        ts.GetCurrentTime()
        ts.seconds += 86400
        return api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
            campaign=res.Campaign(id=c.id, schedule_time=ts),
            update_mask=field_mask_pb2.FieldMask(paths=["schedule_time"])), metadata=api.md)
    if state == "RUNNING":
        return running(api, url)
    if state == "PAUSED":
        return paused(api, url)
    if state == "CANCELLED":
        return cancelled(api, url)
    return completed(api, engine, url)


COUNTERS = ("pending_count", "sent_count", "delivered_count", "read_count", "failed_count", "skipped_count",
            "credits_consumed_unfolded", "credits_released_unfolded")


def stable(r: dict[str, Any] | None) -> dict[str, Any]:
    """The campaign row without the message counters and the credits they consumed (lanes of a RUNNING
    campaign may be reporting, and a send in flight at a Pause is reported after it)."""
    return {k: v for k, v in (r or {}).items() if k not in COUNTERS}


def state_name(c: res.Campaign) -> str:
    return res.CampaignState.Name(c.state).removeprefix("CAMPAIGN_STATE_")


Op = Callable[[Api, res.Campaign], Any]


def op_update(api: Api, c: res.Campaign) -> Any:
    return api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, name="renamed"), update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=api.md)


def op_delete(api: Api, c: res.Campaign) -> Any:
    return api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=c.id), metadata=api.md)


OPS: dict[str, tuple[Op, set[str]]] = {
    "update": (op_update, {"DRAFT", "SCHEDULED"}),
    "start": (lambda a, c: a.start(c.id), {"DRAFT", "SCHEDULED"}),
    "pause": (lambda a, c: a.pause(c.id), {"RUNNING"}),
    "resume": (lambda a, c: a.resume(c.id), {"PAUSED"}),
    "cancel": (lambda a, c: a.cancel(c.id), {"SCHEDULED", "RUNNING", "PAUSED"}),
    "delete": (op_delete, {"DRAFT", "CANCELLED", "COMPLETED"}),
}
EXPECTED_RESULT = {"update": None, "start": "RUNNING", "pause": "PAUSED", "resume": "RUNNING",
                   "cancel": "CANCELLED"}

CASES = [(op, st) for op in OPS for st in STATES]


@pytest.mark.parametrize(("op", "state"), CASES, ids=[f"{o}-from-{s}" for o, s in CASES])
def test_lifecycle_table(op: str, state: str, api: Api, engine: sa.Engine, live: str) -> None:
    c = in_state(state, api, engine, live)
    assert state_name(c) == state
    fn, allowed = OPS[op]
    if state in allowed:
        out = fn(api, c)
        if op == "delete":
            assert out.campaign_id == c.id
            assert row(engine, "campaigns", c.id) is None
            f = fails(api.get, c.id)
            assert f.code == grpc.StatusCode.NOT_FOUND
        else:
            want = EXPECTED_RESULT[op] or state
            assert state_name(out) == want
            assert state_name(api.get(c.id)) == want
    else:
        before = stable(row(engine, "campaigns", c.id))
        f = fails(fn, api, c)
        assert f.code == grpc.StatusCode.FAILED_PRECONDITION, f
        assert f.reason == "INVALID_STATE_TRANSITION"
        assert f.metadata["current_state"] == f"CAMPAIGN_STATE_{state}"
        if op == "delete":
            assert DELETE_MESSAGE in f.message
        assert stable(row(engine, "campaigns", c.id)) == before, "a refused transition changed the campaign row"


def test_create_is_draft_or_scheduled(api: Api) -> None:
    assert api.campaign([]).state == res.CAMPAIGN_STATE_DRAFT
    assert scheduled(api).state == res.CAMPAIGN_STATE_SCHEDULED


def test_clearing_schedule_time_moves_back_to_draft(api: Api) -> None:
    c = scheduled(api)
    out = api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id), update_mask=field_mask_pb2.FieldMask(paths=["schedule_time"])),
        metadata=api.md)
    assert out.state == res.CAMPAIGN_STATE_DRAFT and not out.HasField("schedule_time")


def test_start_creates_one_message_per_contact_round_robin_over_chips(api: Api, engine: sa.Engine,
                                                                      live: str) -> None:
    chips = [slow_chip(api, live) for _ in range(3)]
    c = draft(api, chips, contacts=10)
    started = api.start(c.id)
    assert started.pending_count + started.sent_count + started.failed_count == 10
    assert started.HasField("start_time")
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT m.seq, m.chip_id::text, m.template_index, cc.row_no FROM campaign_messages m"
            " JOIN campaign_contacts cc ON cc.id = m.contact_id WHERE m.campaign_id = :c ORDER BY m.seq"),
            {"c": c.id}).all()
    assert [r.seq for r in rows] == list(range(1, 11))
    assert [r.chip_id for r in rows] == [chips[i % 3].id for i in range(10)]
    assert [r.row_no for r in rows] == sorted(r.row_no for r in rows)  # import order
    assert {r.template_index for r in rows} == {0}
    assert count(engine, "SELECT count(DISTINCT contact_id) FROM campaign_messages WHERE campaign_id = :c",
                 c=c.id) == 10


def test_start_debits_credits_and_cancel_refunds_unsent(api: Api, engine: sa.Engine, live: str,
                                                        api_key: str) -> None:
    h = key_hash(api_key)
    credits = lambda: count(engine, "SELECT credits FROM users WHERE api_key_hash = :h", h=h)  # noqa: E731
    start_balance = credits()
    c = running(api, live, contacts=8)
    assert credits() == start_balance - 8
    done = api.cancel(c.id)
    assert done.failed_count == 8 - done.sent_count and done.pending_count == 0
    # A send in flight at the Cancel may be reported SENT after it (and charged again): the balance
    # and the campaign's consumption, read in one snapshot, must agree whenever that lands.
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        available = conn.execute(sa.text("SELECT credits FROM users WHERE api_key_hash = :h"), {"h": h}).scalar_one()
        # (the campaign is CANCELLED: whatever it settled is folded into the users row)
        consumed = conn.execute(sa.text("SELECT COALESCE(sum(amount), 0) FROM credit_transactions"
                                        " WHERE campaign_id = :c AND kind = :k"),
                                {"c": c.id, "k": int(CreditKind.CONSUME)}).scalar_one()
    assert consumed >= done.sent_count
    assert available == start_balance - consumed


def test_start_needs_contacts_chips_templates_and_credits(api: Api, live: str, create_user: Callable[..., str],
                                                          campaign_channel: grpc.Channel) -> None:
    no_contacts = draft(api, [slow_chip(api, live)])
    f = fails(api.start, no_contacts.id)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "NO_CONTACTS"

    no_chip = draft(api, [], contacts=2)  # the user has chips, but...
    poor = Api(campaign_channel, create_user(credits=1))
    chipless = draft(poor, [], contacts=2)
    f = fails(poor.start, chipless.id)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "NO_USABLE_CHIP"
    slow_chip(poor, live)
    f = fails(poor.start, chipless.id)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "INSUFFICIENT_CREDITS"
    assert poor.get(chipless.id).state == res.CAMPAIGN_STATE_DRAFT

    no_templates = api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name="no templates")), metadata=api.md)
    api.import_phones(no_templates.id, phones(2))
    f = fails(api.start, no_templates.id)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "NO_TEMPLATES"

    # empty chip_ids means every ACTIVE chip of the user
    assert api.start(no_chip.id).state == res.CAMPAIGN_STATE_RUNNING


def test_cancel_fails_open_messages_with_reason_and_sets_complete_time(api: Api, engine: sa.Engine,
                                                                       live: str) -> None:
    c = running(api, live, contacts=6)
    with engine.begin() as conn:  # one message failed earlier, one is leased (campaign row first: lock order)
        conn.execute(sa.text("SELECT 1 FROM campaigns WHERE id = :c FOR UPDATE"), {"c": c.id})
        ids = conn.execute(sa.text("SELECT id FROM campaign_messages WHERE campaign_id = :c AND state = 1"
                                   " ORDER BY seq DESC LIMIT 2"), {"c": c.id}).scalars().all()
        conn.execute(sa.text("UPDATE campaign_messages SET state = 6, failure_reason = 'boom' WHERE id = :i"),
                     {"i": ids[0]})
        conn.execute(sa.text("UPDATE campaign_messages SET state = 2 WHERE id = :i"), {"i": ids[1]})
        conn.execute(sa.text("UPDATE campaigns SET failed_count = failed_count + 1,"
                             " pending_count = pending_count - 1 WHERE id = :c"), {"c": c.id})
    done = api.cancel(c.id)
    assert done.state == res.CAMPAIGN_STATE_CANCELLED and done.HasField("complete_time")
    with engine.connect() as conn:
        states = conn.execute(sa.text("SELECT state, failure_reason FROM campaign_messages WHERE campaign_id = :c"),
                              {"c": c.id}).all()
    open_or_failed = [s for s in states if s.state not in (3, 4, 5, 7)]
    assert open_or_failed and all(s.state == 6 and s.failure_reason == "cancelled by user" for s in open_or_failed)
    assert not [s for s in states if s.state in (1, 2)]
    assert done.pending_count == 0
    assert done.failed_count == len(open_or_failed)
    audit = count(engine, "SELECT count(*) FROM audit_log WHERE entity_id = :c AND action = 'campaign.cancel'",
                  c=c.id)
    assert audit == 1


def test_pause_keeps_pending_and_resume_bumps_epoch(api: Api, engine: sa.Engine, live: str) -> None:
    c = running(api, live, contacts=6)
    epoch0 = row(engine, "campaigns", c.id)["dispatch_epoch"]  # type: ignore[index]
    p = api.pause(c.id)
    assert p.state == res.CAMPAIGN_STATE_PAUSED
    assert count(engine, "SELECT count(*) FROM campaign_messages WHERE campaign_id = :c AND state = 6",
                 c=c.id) == 0
    r = api.resume(c.id)
    assert r.state == res.CAMPAIGN_STATE_RUNNING
    assert row(engine, "campaigns", c.id)["dispatch_epoch"] == epoch0 + 2  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM audit_log WHERE entity_id = :c AND action IN"
                 " ('campaign.start', 'campaign.pause')", c=c.id) == 2
    api.cancel(c.id)


def test_delete_removes_contacts_messages_media_and_reports_counts(api: Api, engine: sa.Engine, live: str,
                                                                   workdir: Any) -> None:
    chip = slow_chip(api, live)
    c = draft(api, [chip], contacts=5)
    media = api.campaigns.UploadMedia(cs.UploadMediaRequest(campaign_id=c.id, filename="a.txt",
                                                            mime_type="text/plain", content=b"hello"),
                                      metadata=api.md)
    [path] = (workdir / "media" / "u").glob(f"*/{media.sha256}")
    assert path.read_bytes() == b"hello"
    api.start(c.id)
    api.cancel(c.id)
    out = op_delete(api, c)
    assert (out.deleted_contacts, out.deleted_messages, out.deleted_media, out.deleted_media_files) == (5, 5, 1, 1)
    assert not path.exists()
    for table in ("campaign_contacts", "campaign_messages", "campaign_media"):
        assert count(engine, f"SELECT count(*) FROM {table} WHERE campaign_id = :c", c=c.id) == 0
    assert row(engine, "chips", chip.id) is not None
    assert count(engine, "SELECT count(*) FROM audit_log WHERE entity_id = :c AND action = 'campaign.delete'",
                 c=c.id) == 1


def test_seed_validation_21_campaigns_4_running_cancel_delete_17_remain(
        api: Api, engine: sa.Engine, live: str) -> None:
    chips = [slow_chip(api, live) for _ in range(2)]
    run = []
    for i in range(21):
        c = draft(api, chips, contacts=5, name=f"Teste_{i}")
        if i % 5 == 0 and len(run) < 4:
            api.start(c.id)
            run.append(c.id)
    listed = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=100), metadata=api.md).campaigns
    assert len(listed) == 21
    assert sum(1 for c in listed if c.state == res.CAMPAIGN_STATE_RUNNING) == 4
    chip_rows = [row(engine, "chips", ch.id) for ch in chips]

    for cid in run:
        assert api.cancel(cid).state == res.CAMPAIGN_STATE_CANCELLED
    for cid in run:
        out = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=cid), metadata=api.md)
        assert (out.deleted_messages, out.deleted_contacts) == (5, 5)

    remaining = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=100), metadata=api.md).campaigns
    assert len(remaining) == 17
    assert not set(run) & {c.id for c in remaining}
    with engine.connect() as conn:
        for table in ("campaign_contacts", "campaign_messages", "campaign_media"):
            n = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE campaign_id = ANY(CAST(:ids AS uuid[]))"),
                             {"ids": run}).scalar_one()
            assert n == 0, table
        assert conn.execute(sa.text("SELECT count(*) FROM campaigns WHERE id = ANY(CAST(:ids AS uuid[]))"),
                            {"ids": run}).scalar_one() == 0
    assert [row(engine, "chips", ch.id) for ch in chips] == chip_rows


def test_delete_logs_the_seed_lines(api: Api, live: str, campaign_server: Any) -> None:
    c = draft(api, [slow_chip(api, live)], contacts=3, name="logged")
    api.start(c.id)
    api.cancel(c.id)
    op_delete(api, c)
    import time

    lines: list[str] = []
    for _ in range(50):
        lines = [ln for ln in campaign_server.tail(400).splitlines() if c.id in ln]
        if any("deleted" in ln and "campaign " + c.id in ln for ln in lines):
            break
        time.sleep(0.1)
    text = "\n".join(lines)
    for want in (f"deleting campaign {c.id} (name: logged)", f"dispatch jobs revoked for campaign {c.id}",
                 f"0 media deleted from campaign {c.id}", f"3 messages deleted from campaign {c.id}",
                 f"3 contacts deleted from campaign {c.id}", f"campaign {c.id} deleted"):
        assert want in text, want

