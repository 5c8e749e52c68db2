# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""Bad input: each a precise status code naming the offending field, and nothing written
(the user's rows are compared before and after)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2

from tests.helpers import Api
from tests.test_campaign_support import (  # noqa: F401
    api,
    draft,
    engine,
    fails,
    live,
    other_api,
    running,
    slow_chip,
    snapshot,
)
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import resources_pb2 as res


def create_req(**fields: Any) -> cs.CreateCampaignRequest:
    fields.setdefault("name", "ok")
    fields.setdefault("templates", [res.MessageTemplate(text="hi")])
    return cs.CreateCampaignRequest(campaign=res.Campaign(**fields))


def past() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    ts.seconds -= 60
    return ts


CREATE_CASES: dict[str, tuple[Callable[[], cs.CreateCampaignRequest], str]] = {
    "empty name": (lambda: create_req(name=""), "campaign.name"),
    "blank name": (lambda: create_req(name="   "), "campaign.name"),
    "long name": (lambda: create_req(name="x" * 201), "campaign.name"),
    "unknown chip id": (lambda: create_req(chip_ids=["6f1b1c53-0000-4000-8000-000000000000"]),
                        "campaign.chip_ids[0]"),
    "malformed chip id": (lambda: create_req(chip_ids=["not-a-uuid"]), "campaign.chip_ids[0]"),
    "interval min > max": (lambda: create_req(settings=res.CampaignSettings(pacing=res.Pacing(
        interval_min_seconds=90, interval_max_seconds=30))), "campaign.settings.pacing.interval_min_seconds"),
    "negative interval": (lambda: create_req(settings=res.CampaignSettings(pacing=res.Pacing(
        interval_max_seconds=-1))), "campaign.settings.pacing.interval_max_seconds"),
    "bad window hours": (lambda: create_req(settings=res.CampaignSettings(pacing=res.Pacing(
        window=res.SendingWindow(start_hour=20, end_hour=8)))), "campaign.settings.pacing.window.end_hour"),
    "bad timezone": (lambda: create_req(settings=res.CampaignSettings(pacing=res.Pacing(
        window=res.SendingWindow(timezone="Mars/Olympus", start_hour=8, end_hour=20)))),
        "campaign.settings.pacing.window.timezone"),
    "negative cap": (lambda: create_req(settings=res.CampaignSettings(pacing=res.Pacing(max_per_hour=-5))),
                     "campaign.settings.pacing.max_per_hour"),
    "empty template": (lambda: create_req(templates=[res.MessageTemplate(text=" ")]), "campaign.templates[0].text"),
    "schedule in the past": (lambda: create_req(schedule_time=past()), "campaign.schedule_time"),
    # PostgreSQL text cannot hold NUL: refused before any handler runs (was INTERNAL)
    "NUL in the name": (lambda: create_req(name="\x00"), "campaign.name"),
    "NUL in a template": (lambda: create_req(templates=[res.MessageTemplate(text="hi"),
                                                        res.MessageTemplate(text="a\x00b")]),
                          "campaign.templates[1].text"),
}


@pytest.mark.parametrize("case", list(CREATE_CASES))
def test_create_rejects_bad_input(case: str, api: Api, engine: sa.Engine, api_key: str) -> None:
    make, field = CREATE_CASES[case]
    before = snapshot(engine, api_key)
    f = fails(api.campaigns.CreateCampaign, make(), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT, f
    assert field in f.fields, f
    assert snapshot(engine, api_key) == before


def test_other_users_chip_id_is_invalid_argument(api: Api, other_api: Api, live: str, engine: sa.Engine,
                                                 api_key: str) -> None:
    theirs = slow_chip(other_api, live)
    mine = slow_chip(api, live)
    before = snapshot(engine, api_key)
    f = fails(api.campaigns.CreateCampaign, create_req(chip_ids=[mine.id, theirs.id]), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["campaign.chip_ids[1]"]
    assert snapshot(engine, api_key) == before


@pytest.mark.parametrize("page_size", [-1, -1000])
def test_negative_page_size(page_size: int, api: Api, live: str) -> None:
    c = draft(api)
    for call, req in ((api.campaigns.ListCampaigns, cs.ListCampaignsRequest(page_size=page_size)),
                      (api.campaigns.ListContacts, cs.ListContactsRequest(campaign_id=c.id, page_size=page_size)),
                      (api.campaigns.ListCampaignMessages,
                       cs.ListCampaignMessagesRequest(campaign_id=c.id, page_size=page_size)),
                      (api.chips.ListChips, chs.ListChipsRequest(page_size=page_size))):
        f = fails(call, req, metadata=api.md)
        assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["page_size"], f


@pytest.mark.parametrize("phone", ["", "abc", "12", "+55 (11) 9999-99999-99999", "0000000000"])
def test_malformed_chip_phone(phone: str, api: Api, engine: sa.Engine, api_key: str) -> None:
    before = snapshot(engine, api_key)
    f = fails(api.chips.RegisterChip, chs.RegisterChipRequest(chip=res.Chip(
        phone=phone, waha_base_url="http://127.0.0.1:3000", waha_session="default")), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["chip.phone"], f
    assert snapshot(engine, api_key) == before


def test_chip_requires_url_session_and_valid_pacing(api: Api) -> None:
    f = fails(api.chips.RegisterChip, chs.RegisterChipRequest(chip=res.Chip(
        phone="+5511912345678", waha_base_url="ftp://x", waha_session="",
        pacing=res.Pacing(interval_min_seconds=10, interval_max_seconds=1))), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(f.fields) == {"chip.waha_base_url", "chip.waha_session", "chip.pacing.interval_min_seconds"}


def test_update_of_running_campaign_is_failed_precondition(api: Api, live: str, engine: sa.Engine,
                                                           api_key: str) -> None:
    c = running(api, live, contacts=4)
    cols = ("name", "description", "templates", "settings", "chip_ids", "schedule_time", "state", "version",
            "updated_at")
    pick = lambda snap: [{k: r[k] for k in cols} for r in snap["campaigns"] if str(r["id"]) == c.id]  # noqa: E731
    before_campaign = pick(snapshot(engine, api_key))
    f = fails(api.campaigns.UpdateCampaign, cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, name="new name", etag=c.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=api.md)
    assert f.code == grpc.StatusCode.FAILED_PRECONDITION and f.reason == "INVALID_STATE_TRANSITION"
    assert f.metadata["current_state"] == "CAMPAIGN_STATE_RUNNING" and f.metadata["operation"] == "UPDATE"
    assert pick(snapshot(engine, api_key)) == before_campaign
    api.cancel(c.id)


@pytest.mark.parametrize(("paths", "field"), [
    (["state"], "update_mask"), (["nope"], "update_mask"), (["settings.nope"], "update_mask"),
    (["name"], "campaign.name"),
    (["settings.pacing"], "campaign.settings.pacing.interval_min_seconds"),
])
def test_bad_update(paths: list[str], field: str, api: Api, engine: sa.Engine, api_key: str) -> None:
    c = draft(api)
    before = snapshot(engine, api_key)
    f = fails(api.campaigns.UpdateCampaign, cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, name="", settings=res.CampaignSettings(pacing=res.Pacing(
            interval_min_seconds=100, interval_max_seconds=1))),
        update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and field in f.fields, f
    assert snapshot(engine, api_key) == before


def test_subpath_update_is_validated_after_merge(api: Api) -> None:
    c = api.campaigns.CreateCampaign(create_req(settings=res.CampaignSettings(pacing=res.Pacing(
        interval_min_seconds=10, interval_max_seconds=20))), metadata=api.md)
    f = fails(api.campaigns.UpdateCampaign, cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, settings=res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=50))),
        update_mask=field_mask_pb2.FieldMask(paths=["settings.pacing.interval_min_seconds"])), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f.fields == ["campaign.settings.pacing.interval_min_seconds"]


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123"])
def test_malformed_ids_are_invalid_argument(bad_id: str, api: Api) -> None:
    for call, req, field in (
            (api.campaigns.GetCampaign, cs.GetCampaignRequest(campaign_id=bad_id), "campaign_id"),
            (api.campaigns.StartCampaign, cs.StartCampaignRequest(campaign_id=bad_id), "campaign_id"),
            (api.campaigns.DeleteCampaign, cs.DeleteCampaignRequest(campaign_id=bad_id), "campaign_id"),
            (api.campaigns.UpdateCampaign, cs.UpdateCampaignRequest(
                campaign=res.Campaign(id=bad_id, name="x"), update_mask=field_mask_pb2.FieldMask(paths=["name"])),
             "campaign.id"),
            (api.chips.GetChip, chs.GetChipRequest(chip_id=bad_id), "chip_id")):
        f = fails(call, req, metadata=api.md)
        assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == [field], f


def test_unknown_ids_are_not_found(api: Api) -> None:
    missing = "6f1b1c53-0000-4000-8000-000000000000"
    assert fails(api.get, missing).code == grpc.StatusCode.NOT_FOUND
    assert fails(api.cancel, missing).code == grpc.StatusCode.NOT_FOUND
    assert fails(api.chips.GetChip, chs.GetChipRequest(chip_id=missing), metadata=api.md).code == \
        grpc.StatusCode.NOT_FOUND
