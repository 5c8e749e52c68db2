"""Tenants, URLs and secrets: for every public RPC that names a resource, another user gets NOT_FOUND
(the methods are read from the server's own descriptors, so a new RPC is covered the day it lands);
internal RPCs refuse user keys; chip WAHA URLs are limited to the operator's WAHA hosts; chip API keys
are sealed at rest, never returned and never logged."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any
from unittest import mock

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from campaign_service import admin
from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY, auth
from tests.helpers import Ops, error_details, phones, user_id
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh

#: Which of user A's resources an id field names, by field name.
RESOURCE_OF = {"campaign_id": "campaign", "chip_id": "chip", "endpoint_id": "webhook", "id": None,
               "media_id": "media"}
#: Resource messages whose `id`-like field names the resource itself (Update requests carry them).
SELF_ID = {"whago.campaign.v1.Campaign": ("id", "campaign"), "whago.campaign.v1.WebhookEndpoint":
           ("endpoint_id", "webhook")}


PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15"
       b"\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")
#: What else a request needs to pass validation, so the answer is about the resource.
VALID_REST: dict[str, dict[str, Any]] = {
    "UpdateCampaign": {"campaign": {"name": "x"}, "update_mask": {"paths": ["name"]}},
    "UpdateWebhookEndpoint": {"endpoint": {"description": "x"}, "update_mask": {"paths": ["description"]}},
    "RedeliverEvent": {"event_id": 1},
    "UploadMedia": {"filename": "a.png", "mime_type": "image/png", "content": PNG},
    "UploadMediaChunks": {"filename": "a.png", "mime_type": "image/png", "content": PNG},
}
#: A campaign id there filters the caller's own list (an empty answer, not a lookup).
FILTERS = {"ListCreditTransactions"}


def _fill(desc: Descriptor, msg: Message, ids: dict[str, str], depth: int = 0) -> bool:
    """Set every field that names a resource to user A's; True when one was set."""
    named = False
    for f in desc.fields:
        if f.message_type is None:
            kind = RESOURCE_OF.get(f.name)
            if kind is None and desc.full_name in SELF_ID and f.name == SELF_ID[desc.full_name][0]:
                kind = SELF_ID[desc.full_name][1]
            if kind and kind in ids and f.type == f.TYPE_STRING and not f.is_repeated:
                setattr(msg, f.name, ids[kind])
                named = True
        elif depth < 1 and not f.is_repeated and f.message_type.full_name in SELF_ID:
            named |= _fill(f.message_type, getattr(msg, f.name), ids, depth + 1)
    return named


def _call(channel: grpc.Channel, m: MethodDescriptor, request: Message, md: Any) -> grpc.StatusCode:
    path = f"/{m.containing_service.full_name}/{m.name}"
    out = message_factory.GetMessageClass(m.output_type).FromString
    ser = type(request).SerializeToString
    try:
        if m.client_streaming:
            channel.stream_unary(path, ser, out)(iter([request]), metadata=md, timeout=10)
        elif m.server_streaming:
            for _ in channel.unary_stream(path, ser, out)(request, metadata=md, timeout=10):
                break
        else:
            channel.unary_unary(path, ser, out)(request, metadata=md, timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_another_user_gets_not_found_for_every_rpc_naming_a_resource(
        stack: dict[str, ServiceProcess], campaign_channel: grpc.Channel, create_user: Any, sandbox_url: str) -> None:
    a = Ops(campaign_channel, create_user())
    b = Ops(campaign_channel, create_user())
    chip = a.chip(sandbox_url, SANDBOX_API_KEY, interval=(3600, 3600))
    camp = a.campaign([chip])
    a.import_phones(camp.id, phones(2, start=9100))
    hook = a.webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
        url="http://127.0.0.1:9/h", enabled=True)), metadata=a.md).endpoint
    media = a.campaigns.UploadMedia(cs.UploadMediaRequest(campaign_id=camp.id, filename="a.png", mime_type="image/png",
                                                          content=PNG), metadata=a.md)
    ids = {"campaign": camp.id, "chip": chip.id, "webhook": hook.endpoint_id, "media": media.id}
    db = ProtoReflectionDescriptorDatabase(campaign_channel)
    pool = descriptor_pool.DescriptorPool(db)
    checked, wrong = [], []
    for service in db.get_services():
        if not service.startswith("whago."):
            continue
        for m in pool.FindServiceByName(service).methods:
            if m.name.startswith(("Create", "Register")) or m.name in FILTERS:
                continue  # ids there are output only
            request = message_factory.GetMessageClass(m.input_type)()
            if not _fill(m.input_type, request, ids):
                continue
            for field, value in VALID_REST.get(m.name, {}).items():  # past request validation, to the lookup
                request.MergeFrom(type(request)(**{field: value}))
            code = _call(campaign_channel, m, request, b.md)
            if service.endswith("DeliveryService"):
                if code != grpc.StatusCode.PERMISSION_DENIED:  # internal: user keys are refused outright
                    wrong.append(f"{service}/{m.name}: {code.name}")
            elif code != grpc.StatusCode.NOT_FOUND:
                wrong.append(f"{service}/{m.name}: {code.name}")
            checked.append(m.name)
    assert not wrong, wrong
    assert {"GetCampaign", "DeleteCampaign", "StartCampaign", "ImportContacts", "WatchCampaign", "GetChip",
            "DeleteChip", "GetWebhookEndpoint", "UpdateCampaign", "UpdateWebhookEndpoint",
            "PreviewMessages", "DeleteMedia", "UploadMediaChunks"} <= set(checked)
    assert a.get(camp.id).state == res.CAMPAIGN_STATE_DRAFT  # and A's resources are untouched


def test_chip_waha_urls_are_limited_to_the_operators_hosts(api: Ops) -> None:
    for url in ("http://10.1.2.3:3000", "http://169.254.169.254", "http://waha.example.com:3000"):
        with pytest.raises(grpc.RpcError) as e:
            api.chip(url, SANDBOX_API_KEY)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "WHAGO_WAHA_HOSTS" in (e.value.details() or "")
    assert list(api.chips.ListChips(chs.ListChipsRequest(), metadata=api.md).chips) == []


def test_chip_api_keys_are_sealed_at_rest_never_returned_never_logged(
        api: Ops, sandbox_url: str, database_url: str, campaign_server: ServiceProcess,
        dispatcher_server: ServiceProcess) -> None:
    secret = SANDBOX_API_KEY  # the key the sandbox wants: a send proves the lane got it back opened
    chip = api.chip(sandbox_url, secret)
    assert chip.waha_api_key == ""  # input only
    eng = sa.create_engine(database_url)
    try:
        with eng.connect() as conn:
            stored = conn.execute(sa.text("SELECT waha_api_key FROM chips WHERE id = :i"), {"i": chip.id}).scalar_one()
    finally:
        eng.dispose()
    assert stored.startswith("fernet:") and secret not in stored
    camp = api.campaign([chip])
    api.import_phones(camp.id, phones(1, start=9200))
    api.start(camp.id)
    assert api.wait_final(camp.id).sent_count == 1
    for proc in (campaign_server, dispatcher_server):
        assert secret not in proc.log_path.read_text(errors="replace")


def test_user_keys_cannot_call_internal_rpcs(campaign_channel: grpc.Channel, api_key: str) -> None:
    call = campaign_channel.unary_unary("/whago.campaign.v1.DeliveryService/LeaseMessages",
                                        lambda b: b, lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        call(b"", metadata=auth(api_key), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _admin(database_url: str, *argv: str) -> None:
    with mock.patch.dict(os.environ, {"DATABASE_URL": database_url}), contextlib.redirect_stderr(io.StringIO()):
        assert admin.main(list(argv)) == 0


def _details(err: grpc.RpcError) -> list[Any]:
    return [*error_details(err, error_details_pb2.QuotaFailure), *error_details(err, error_details_pb2.RetryInfo)]


def test_operator_quotas_and_rate_limit_answer_resource_exhausted(
        api: Ops, sandbox_url: str, database_url: str) -> None:
    eng = sa.create_engine(database_url)
    try:
        uid = user_id(eng, api.md[0][1].split()[-1])
    finally:
        eng.dispose()
    _admin(database_url, "set-limits", "--user-id", str(uid), "--chips", "1", "--campaigns", "1",
           "--contacts-per-campaign", "3")
    api.chip(sandbox_url, SANDBOX_API_KEY)
    with pytest.raises(grpc.RpcError) as e:
        api.chip(sandbox_url, SANDBOX_API_KEY)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = [d for d in _details(e.value) if isinstance(d, error_details_pb2.QuotaFailure)]
    assert quota and quota[0].violations[0].subject == "chips"
    camp = api.campaign([])
    with pytest.raises(grpc.RpcError) as e:
        api.campaign([])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        api.import_phones(camp.id, phones(4, start=9300))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert api.get(camp.id).total_contacts == 0  # the import rolled back whole
    assert api.import_phones(camp.id, phones(3, start=9300)).imported_count == 3



def test_rate_limit_answers_resource_exhausted_with_retry_info(
        stack: dict[str, ServiceProcess], campaign_channel: grpc.Channel, create_user: Any, database_url: str) -> None:
    key = create_user()
    eng = sa.create_engine(database_url)
    try:
        uid = user_id(eng, key)
    finally:
        eng.dispose()
    _admin(database_url, "set-limits", "--user-id", str(uid), "--rpc-per-second", "2")  # before its first call
    limited = Ops(campaign_channel, key)
    codes = []
    for _ in range(30):
        try:
            limited.campaigns.ListCampaigns(cs.ListCampaignsRequest(), metadata=limited.md)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
            retry = [d for d in _details(err) if isinstance(d, error_details_pb2.RetryInfo)]
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry, err
    assert codes[:4] == ["OK"] * 4 and "RESOURCE_EXHAUSTED" in codes, codes  # a burst of 2 x rate, then refused
