# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""CampaignService standard methods: Create/Get/List/Update/Delete, pagination, etags, AIP-155
request ids, media upload."""

from __future__ import annotations

from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from tests.helpers import Api, key_hash, user_id
from tests.test_campaign_support import api, count, engine, fails, live, row, slow_chip  # noqa: F401
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res


def create(api: Api, name: str = "c", request_id: str = "", **fields: Any) -> res.Campaign:
    return api.campaigns.CreateCampaign(cs.CreateCampaignRequest(
        campaign=res.Campaign(name=name, templates=[res.MessageTemplate(text="hi {{name}}")], **fields),
        request_id=request_id), metadata=api.md)


def list_all(api: Api, page_size: int, state: int = 0) -> tuple[list[res.Campaign], int]:
    out: list[res.Campaign] = []
    token, pages = "", 0
    while True:
        resp = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=page_size, page_token=token,
                                                                   state=state), metadata=api.md)
        pages += 1
        out += resp.campaigns
        token = resp.next_page_token
        if not token:
            return out, pages


def test_create_get_roundtrip_with_settings(api: Api, live: str) -> None:
    chip = slow_chip(api, live)
    settings = res.CampaignSettings(
        pacing=res.Pacing(interval_min_seconds=40, interval_max_seconds=90, max_per_hour=20,
                          window=res.SendingWindow(timezone="America/Sao_Paulo", start_hour=8, end_hour=20,
                                                   weekdays=[1, 2, 3, 4, 5])),
        camouflage=res.Camouflage(send_seen=False, typing_chars_per_second=10), shuffle_contacts=True,
        max_failures=7)
    c = create(api, "full", description="d", settings=settings, chip_ids=[chip.id])
    got = api.get(c.id)
    assert got == c
    assert got.name == "full" and got.description == "d" and got.state == res.CAMPAIGN_STATE_DRAFT
    settings.verify_numbers = True  # a new campaign verifies numbers unless told otherwise
    assert got.settings == settings and list(got.chip_ids) == [chip.id]
    assert got.templates[0].text == "hi {{name}}"
    assert got.etag and got.HasField("create_time") and got.HasField("update_time")


def test_list_is_newest_first_paginated_and_filtered(api: Api) -> None:
    made = [create(api, f"p{i}").id for i in range(7)]
    got, pages = list_all(api, 3)
    assert [c.id for c in got] == made[::-1]
    assert pages == 3
    only_draft, _ = list_all(api, 100, res.CAMPAIGN_STATE_DRAFT)
    assert len(only_draft) == 7
    none, _ = list_all(api, 100, res.CAMPAIGN_STATE_RUNNING)
    assert none == []
    first = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(), metadata=api.md)
    assert len(first.campaigns) == 7 and first.next_page_token == ""


def test_page_size_is_clamped_and_default_50(api: Api, engine: sa.Engine, api_key: str) -> None:
    uid = user_id(engine, api_key)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO campaigns (id, user_id, name, state, created_at)"
                             " SELECT gen_random_uuid(), :u, 'bulk ' || g, 1, now() - g * interval '1 second'"
                             " FROM generate_series(1, 1105) g"), {"u": uid})
    default = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(), metadata=api.md)
    assert len(default.campaigns) == 50 and default.next_page_token
    big = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=5000), metadata=api.md)
    assert len(big.campaigns) == 1000 and big.next_page_token
    rest = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=5000, page_token=big.next_page_token),
                                       metadata=api.md)
    assert len(rest.campaigns) == 105 and rest.next_page_token == ""
    ids = {c.id for c in big.campaigns} | {c.id for c in rest.campaigns}
    assert len(ids) == 1105
    # How fast a page is: `make bench`'s `list` figure (p99 at 100k campaigns), not a test.


def test_bad_page_tokens_are_invalid_argument(api: Api) -> None:
    for token in ("garbage!", "eyJrIjoiY2hpcHMiLCJmIjoiIiwiYyI6W119"):
        f = fails(api.campaigns.ListCampaigns, cs.ListCampaignsRequest(page_token=token), metadata=api.md)
        assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["page_token"], f
    for _ in range(3):
        create(api)
    first = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=1), metadata=api.md)
    f = fails(api.campaigns.ListCampaigns, cs.ListCampaignsRequest(
        page_size=1, page_token=first.next_page_token, state=res.CAMPAIGN_STATE_RUNNING), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["page_token"]


def test_update_with_mask_bumps_etag_and_keeps_other_fields(api: Api) -> None:
    c = create(api, "before", description="keep me")
    assert api.get(c.id) == c  # rendered once: the Gets after each update must not answer this again
    out = api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, name="after", description="ignored", etag=c.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=api.md)
    assert out.name == "after" and out.description == "keep me"
    assert out.etag != c.etag
    assert api.get(c.id) == out
    # settings.* subpaths merge into the stored settings
    out2 = api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, settings=res.CampaignSettings(
            pacing=res.Pacing(interval_min_seconds=45), max_failures=3)),
        update_mask=field_mask_pb2.FieldMask(paths=["settings.pacing.interval_min_seconds"])), metadata=api.md)
    assert out2.settings.pacing.interval_min_seconds == 45 and out2.settings.max_failures == 0
    assert api.get(c.id) == out2


def test_stale_etag_is_aborted_and_changes_nothing(api: Api, engine: sa.Engine) -> None:
    c = create(api)
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, name="v2"), update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=api.md)
    before = row(engine, "campaigns", c.id)
    f = fails(api.campaigns.UpdateCampaign, cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, name="v3", etag=c.etag), update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=api.md)
    assert f.code == grpc.StatusCode.ABORTED and f.reason == "ETAG_MISMATCH"
    f = fails(api.campaigns.DeleteCampaign, cs.DeleteCampaignRequest(campaign_id=c.id, etag=c.etag),
              metadata=api.md)
    assert f.code == grpc.StatusCode.ABORTED
    assert row(engine, "campaigns", c.id) == before


def test_request_id_retry_returns_first_result(api: Api, engine: sa.Engine, api_key: str) -> None:
    a = create(api, "once", request_id="req-create-1")
    b = create(api, "twice?", request_id="req-create-1")
    assert a == b
    n = count(engine, "SELECT count(*) FROM campaigns c JOIN users u ON u.id = c.user_id WHERE u.api_key_hash = :h",
              h=key_hash(api_key))
    assert n == 1
    d1 = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=a.id, request_id="req-del"),
                                      metadata=api.md)
    d2 = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=a.id, request_id="req-del"),
                                      metadata=api.md)
    assert d1 == d2 and d1.campaign_id == a.id
    f = fails(api.campaigns.DeleteCampaign, cs.DeleteCampaignRequest(campaign_id=a.id), metadata=api.md)
    assert f.code == grpc.StatusCode.NOT_FOUND
    # the same request id on another method is a client bug
    f = fails(api.campaigns.CreateCampaign, cs.CreateCampaignRequest(
        campaign=res.Campaign(name="x"), request_id="req-del"), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["request_id"]


def test_request_ids_are_per_user(api: Api, campaign_channel: grpc.Channel, create_user: Any) -> None:
    other = Api(campaign_channel, create_user())
    a = create(api, "mine", request_id="shared-id")
    b = create(other, "theirs", request_id="shared-id")
    assert a.id != b.id and b.name == "theirs"


def test_start_retry_with_request_id_does_not_start_twice(api: Api, engine: sa.Engine, live: str) -> None:
    from tests.test_campaign_support import draft

    c = draft(api, [slow_chip(api, live)], contacts=3)
    req = cs.StartCampaignRequest(campaign_id=c.id, request_id="start-once")
    first = api.campaigns.StartCampaign(req, metadata=api.md)
    again = api.campaigns.StartCampaign(req, metadata=api.md)
    assert first == again and first.state == res.CAMPAIGN_STATE_RUNNING
    assert count(engine, "SELECT count(*) FROM campaign_messages WHERE campaign_id = :c", c=c.id) == 3
    api.cancel(c.id)


def test_upload_and_list_media_and_template_reference(api: Api, workdir: Any) -> None:
    c = create(api)
    jpeg = b"\xff\xd8\xff\xe0data"
    m = api.campaigns.UploadMedia(cs.UploadMediaRequest(campaign_id=c.id, filename="../../etc/pic.jpg",
                                                        mime_type="image/jpeg", content=jpeg),
                                  metadata=api.md)
    assert m.filename == "pic.jpg" and m.size_bytes == 8 and m.campaign_id == c.id
    assert [p.read_bytes() for p in (workdir / "media" / "u").glob(f"*/{m.sha256}")] == [jpeg]
    listed = api.campaigns.ListCampaignMedia(cs.ListCampaignMediaRequest(campaign_id=c.id), metadata=api.md)
    assert [x.id for x in listed.media] == [m.id]
    out = api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, templates=[res.MessageTemplate(text="look", media_id=m.id)]),
        update_mask=field_mask_pb2.FieldMask(paths=["templates"])), metadata=api.md)
    assert out.templates[0].media_id == m.id
    f = fails(api.campaigns.UploadMedia, cs.UploadMediaRequest(
        campaign_id=c.id, filename="big.jpg", mime_type="image/jpeg",
        content=jpeg + b"x" * (5 * 1024 * 1024)), metadata=api.md)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and f.fields == ["content"]
