# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""Authentication and tenancy: no or bad key is UNAUTHENTICATED; another user's campaign or chip is
NOT_FOUND for every method; user keys on the internal DeliveryService are PERMISSION_DENIED, and
the service token is refused on the user-facing services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from campaign_service.interceptors import KeyCache
from tests.conftest import SERVICE_TOKEN
from tests.helpers import Api, phones
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
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import delivery_service_pb2 as ds
from whago.campaign.v1 import delivery_service_pb2_grpc as ds_grpc
from whago.campaign.v1 import resources_pb2 as res


def test_the_key_cache_asks_once_per_key_and_holds_long_keys_by_their_hash() -> None:
    asked: list[str] = []
    cache = KeyCache(lambda h: asked.append(h) or None)  # type: ignore[func-returns-value]
    long_key = "x" * 10_000
    for key in ("whk_a", "whk_a", long_key, long_key):
        assert cache.principal_for(key) is None
    assert len(asked) == 2  # one database lookup per key, by sha256 as stored
    assert all(len(k) <= 128 for k in cache._cache)  # a huge key costs the cache no more than a hash


@pytest.mark.parametrize("metadata", [
    [], [("authorization", "Bearer whk_not-a-real-key")], [("authorization", "Basic abc")],
    [("authorization", "Bearer ")],
], ids=["no-key", "bad-key", "wrong-scheme", "empty-token"])
def test_missing_or_bad_key_is_unauthenticated(metadata: list[tuple[str, str]],
                                               campaign_channel: grpc.Channel) -> None:
    stub = cs_grpc.CampaignServiceStub(campaign_channel)
    f = fails(stub.ListCampaigns, cs.ListCampaignsRequest(), metadata=metadata)
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    f = fails(chs_grpc.ChipServiceStub(campaign_channel).ListChips, chs.ListChipsRequest(), metadata=metadata)
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    f = fails(stub.CreateCampaign, cs.CreateCampaignRequest(campaign=res.Campaign(name="x")),
              metadata=metadata)
    assert f.code == grpc.StatusCode.UNAUTHENTICATED


def test_user_key_on_delivery_service_is_permission_denied(campaign_channel: grpc.Channel, api: Api) -> None:
    stub = ds_grpc.DeliveryServiceStub(campaign_channel)
    f = fails(stub.LeaseMessages, ds.LeaseMessagesRequest(campaign_id="x", chip_id="y", epoch=1, max_messages=1,
                                                          lease_seconds=10), metadata=api.md)
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    f = fails(stub.ReportDeliveries, ds.ReportDeliveriesRequest(campaign_id="x"), metadata=api.md)
    assert f.code == grpc.StatusCode.PERMISSION_DENIED


def test_service_token_is_refused_on_user_services(campaign_channel: grpc.Channel) -> None:
    md = [("authorization", f"Bearer {SERVICE_TOKEN}")]
    f = fails(cs_grpc.CampaignServiceStub(campaign_channel).ListCampaigns, cs.ListCampaignsRequest(), metadata=md)
    assert f.code == grpc.StatusCode.PERMISSION_DENIED


def test_users_see_only_their_own_campaigns(api: Api, other_api: Api) -> None:
    mine = draft(api, name="mine")
    draft(other_api, name="theirs")
    listed = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(), metadata=api.md).campaigns
    assert [c.id for c in listed] == [mine.id]


def _calls(campaign_id: str) -> dict[str, Callable[[Api], Any]]:
    return {
        "get": lambda a: a.get(campaign_id),
        "update": lambda a: a.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
            campaign=res.Campaign(id=campaign_id, name="hijack"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=a.md),
        "delete": lambda a: a.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=campaign_id),
                                                       metadata=a.md),
        "start": lambda a: a.start(campaign_id),
        "pause": lambda a: a.pause(campaign_id),
        "resume": lambda a: a.resume(campaign_id),
        "cancel": lambda a: a.cancel(campaign_id),
        "import": lambda a: a.import_phones(campaign_id, phones(1)),
        "contacts": lambda a: a.campaigns.ListContacts(cs.ListContactsRequest(campaign_id=campaign_id),
                                                       metadata=a.md),
        "messages": lambda a: a.campaigns.ListCampaignMessages(cs.ListCampaignMessagesRequest(
            campaign_id=campaign_id), metadata=a.md),
        "upload": lambda a: a.campaigns.UploadMedia(cs.UploadMediaRequest(
            campaign_id=campaign_id, filename="f.txt", mime_type="text/plain", content=b"x"), metadata=a.md),
        "media": lambda a: a.campaigns.ListCampaignMedia(cs.ListCampaignMediaRequest(campaign_id=campaign_id),
                                                         metadata=a.md),
    }


def test_another_users_campaign_is_not_found_for_every_method(api: Api, other_api: Api, live: str,
                                                              engine: sa.Engine, api_key: str) -> None:
    victim = draft(api, [slow_chip(api, live)], contacts=3)
    api.campaigns.UploadMedia(cs.UploadMediaRequest(campaign_id=victim.id, filename="a.txt", mime_type="text/plain",
                                                    content=b"x"), metadata=api.md)
    before = snapshot(engine, api_key)
    for name, call in _calls(victim.id).items():
        f = fails(call, other_api)
        assert f.code == grpc.StatusCode.NOT_FOUND, (name, f)
    assert snapshot(engine, api_key) == before
    live_one = running(api, live, contacts=6)
    for name in ("pause", "cancel", "get"):
        assert fails(_calls(live_one.id)[name], other_api).code == grpc.StatusCode.NOT_FOUND, name
    assert api.get(live_one.id).state == res.CAMPAIGN_STATE_RUNNING
    api.cancel(live_one.id)


def test_another_users_chip_is_not_found(api: Api, other_api: Api, live: str) -> None:
    chip = slow_chip(api, live)
    for call, req in ((other_api.chips.GetChip, chs.GetChipRequest(chip_id=chip.id)),
                      (other_api.chips.DeleteChip, chs.DeleteChipRequest(chip_id=chip.id))):
        assert fails(call, req, metadata=other_api.md).code == grpc.StatusCode.NOT_FOUND
    assert api.chips.GetChip(chs.GetChipRequest(chip_id=chip.id), metadata=api.md).id == chip.id
