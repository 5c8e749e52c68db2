"""WebhookService and the relay against the whole stack: signed (checked with the reference
`standardwebhooks` library, not our code), ordered per stream, retried, dead-lettered, disabled;
the SSRF guard; secrets rotation; Redis status channels; WatchCampaign; the audit trail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import redis
from google.protobuf import duration_pb2
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from campaign_service.urlguard import GuardedResolver, RefusedURL, URLGuard, parse_allowlist
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import Ops, field_violations, wait_for
from tests.receiver import Receiver
from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def endpoint(api: Ops, url: str, types: tuple[str, ...] = ()) -> wh.CreateWebhookEndpointResponse:
    return api.webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
        url=url, event_types=list(types), enabled=True, description="test")), metadata=api.md)


def bodies(r: Receiver) -> list[dict[str, Any]]:
    return [json.loads(x.body) for x in r.delivered()]


def deliveries(api: Ops, endpoint_id: str) -> list[wh.WebhookDelivery]:
    return list(api.webhooks.ListWebhookDeliveries(wh.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id),
                                                   metadata=api.md).deliveries)


def violations(err: grpc.RpcError) -> list[str]:
    return [f for f, _ in field_violations(err)]


def test_campaign_events_arrive_signed_complete_and_in_order(api: Ops, sandbox_url: str, receiver: Receiver) -> None:
    secret = endpoint(api, receiver.url).secret
    assert secret.startswith("whsec_")
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    api.start_sending(camp.id, 15)
    api.wait_final(camp.id)
    stream = f"campaign:{camp.id}"
    wait_for(lambda: any(b["type"] == "campaign.completed" and b["data"]["stream"] == stream for b in bodies(receiver)),
             20, lambda: f"no campaign.completed among {[b['type'] for b in bodies(receiver)]}")
    hook = Webhook(secret)
    for req in receiver.requests:
        hook.verify(req.body, req.headers)  # raises on a missing or bad signature
        assert req.headers["webhook-id"].startswith("evt_")
    mine = [b for b in bodies(receiver) if b["data"]["stream"] == stream]
    seqs = [b["data"]["seq"] for b in mine]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # complete and in order
    types = [b["type"] for b in mine]
    assert types[:2] == ["campaign.created", "campaign.updated"]  # created, contacts imported
    assert types[-1] == "campaign.completed"
    assert "campaign.started" in types
    assert mine[-1]["data"]["sent_count"] == 15
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43).verify(receiver.requests[0].body, receiver.requests[0].headers)


@pytest.mark.parametrize(("url", "types", "description", "field"), [
    ("ftp://example.com/x", (), "", "endpoint.url"),
    ("http://10.1.2.3/hook", (), "", "endpoint.url"),
    ("http://169.254.169.254/latest/meta-data", (), "", "endpoint.url"),
    ("http://[::1]:9/hook", (), "", "endpoint.url"),
    ("http://user:pw@127.0.0.1:9/hook", (), "", "endpoint.url"),
    ("not a url", (), "", "endpoint.url"),
    ("http://127.0.0.1:9/hook", ("campaign.exploded",), "", "endpoint.event_types[0]"),
    ("http://127.0.0.1:9/hook", (), "x" * 501, "endpoint.description"),
])
def test_bad_endpoints_are_refused_naming_the_field(api: Ops, url: str, types: tuple[str, ...], description: str,
                                                    field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        api.webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
            url=url, event_types=list(types), description=description, enabled=True)), metadata=api.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(e.value)
    listed = api.webhooks.ListWebhookEndpoints(wh.ListWebhookEndpointsRequest(), metadata=api.md)
    assert list(listed.endpoints) == []  # nothing half-written


def test_failures_are_retried_then_dead_lettered(api: Ops, receiver: Receiver) -> None:
    receiver.status = 500
    ep = endpoint(api, receiver.url).endpoint
    api.webhooks.SendTestEvent(wh.SendTestEventRequest(endpoint_id=ep.endpoint_id), metadata=api.md)
    wait_for(lambda: deliveries(api, ep.endpoint_id)[0].state == wh.DELIVERY_STATE_FAILED, 20, "no dead letter")
    d = deliveries(api, ep.endpoint_id)[0]
    assert [a.status_code for a in d.attempts] == [500, 500, 500, 500]  # the whole test schedule
    assert all(a.error == "HTTP 500" for a in d.attempts)
    assert len(receiver.requests) == 4
    assert d.event.type == "webhook.test"


def test_retry_after_is_honoured_and_a_later_success_delivers(api: Ops, receiver: Receiver) -> None:
    receiver.script = [429]
    receiver.retry_after = "1"
    ep = endpoint(api, receiver.url).endpoint
    api.webhooks.SendTestEvent(wh.SendTestEventRequest(endpoint_id=ep.endpoint_id), metadata=api.md)
    wait_for(lambda: deliveries(api, ep.endpoint_id)[0].state == wh.DELIVERY_STATE_DELIVERED, 20, "not delivered")
    first, second = receiver.requests[0], receiver.requests[1]
    assert second.at - first.at >= 0.9  # not the schedule's 0.2 s: the receiver asked for 1 s
    assert first.headers["webhook-id"] == second.headers["webhook-id"]  # same message, for de-duplication
    d = deliveries(api, ep.endpoint_id)[0]
    assert [a.status_code for a in d.attempts] == [429, 200]


def test_rotated_secret_signs_beside_the_old_one_during_the_grace_period(api: Ops, receiver: Receiver) -> None:
    created = endpoint(api, receiver.url)
    eid = created.endpoint.endpoint_id
    rotated = api.webhooks.RotateWebhookSecret(wh.RotateWebhookSecretRequest(
        endpoint_id=eid, grace_period=duration_pb2.Duration(seconds=60)), metadata=api.md)
    assert rotated.secret != created.secret and rotated.HasField("previous_secret_expire_time")
    api.webhooks.SendTestEvent(wh.SendTestEventRequest(endpoint_id=eid), metadata=api.md)
    wait_for(lambda: receiver.delivered(), 10, "no test event")
    req = receiver.delivered()[0]
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    Webhook(created.secret).verify(req.body, req.headers)
    Webhook(rotated.secret).verify(req.body, req.headers)
    api.webhooks.RotateWebhookSecret(wh.RotateWebhookSecretRequest(
        endpoint_id=eid, grace_period=duration_pb2.Duration(seconds=0)), metadata=api.md)
    with pytest.raises(grpc.RpcError) as e:
        api.webhooks.RotateWebhookSecret(wh.RotateWebhookSecretRequest(
            endpoint_id=eid, grace_period=duration_pb2.Duration(seconds=8 * 86400)), metadata=api.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grace_period" in violations(e.value)


def test_endpoint_failing_too_long_is_disabled_with_an_event(api: Ops, receiver: Receiver) -> None:
    dead = Receiver().start()
    dead_url = dead.url
    dead.stop()  # nothing listens there any more: connection refused
    watcher = endpoint(api, receiver.url, ("webhook.disabled",))
    ep = endpoint(api, dead_url).endpoint
    send = wh.SendTestEventRequest(endpoint_id=ep.endpoint_id)
    api.webhooks.SendTestEvent(send, metadata=api.md)
    wait_for(lambda: deliveries(api, ep.endpoint_id)[0].state == wh.DELIVERY_STATE_FAILED, 20, "no dead letter")

    def disabled() -> bool:
        got = api.webhooks.GetWebhookEndpoint(wh.GetWebhookEndpointRequest(endpoint_id=ep.endpoint_id),
                                              metadata=api.md)
        if got.enabled:
            try:
                api.webhooks.SendTestEvent(send, metadata=api.md)  # fails again, later than 3 s after the first
            except grpc.RpcError:
                pass
        return not got.enabled
    wait_for(disabled, 30, "endpoint never disabled")
    got = api.webhooks.GetWebhookEndpoint(wh.GetWebhookEndpointRequest(endpoint_id=ep.endpoint_id), metadata=api.md)
    assert "failed since" in got.disabled_reason and got.HasField("failing_since")
    wait_for(lambda: any(b["type"] == "webhook.disabled" for b in bodies(receiver)), 10, "no webhook.disabled event")
    assert bodies(receiver)[0]["data"]["endpoint_id"] == ep.endpoint_id
    with pytest.raises(grpc.RpcError) as e:
        api.webhooks.SendTestEvent(send, metadata=api.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    entries = api.audit.ListAuditEvents(aud.ListAuditEventsRequest(entity_type="webhook", action="webhook.disable"),
                                        metadata=api.md).audit_events
    assert [(a.entity_id, a.actor) for a in entries] == [(ep.endpoint_id, "system:webhooks")]
    assert watcher.endpoint.enabled


def test_redeliver_and_crud(api: Ops, receiver: Receiver) -> None:
    ep = endpoint(api, receiver.url).endpoint
    api.webhooks.SendTestEvent(wh.SendTestEventRequest(endpoint_id=ep.endpoint_id), metadata=api.md)
    wait_for(lambda: receiver.delivered(), 10, "no test event")
    event_id = deliveries(api, ep.endpoint_id)[0].event.id
    again = api.webhooks.RedeliverEvent(wh.RedeliverEventRequest(endpoint_id=ep.endpoint_id, event_id=event_id),
                                        metadata=api.md)
    assert again.event.id == event_id and again.state == wh.DELIVERY_STATE_PENDING
    wait_for(lambda: len(receiver.delivered()) == 2, 10, "not redelivered")
    assert receiver.delivered()[0].headers["webhook-id"] == receiver.delivered()[1].headers["webhook-id"]
    with pytest.raises(grpc.RpcError) as e:
        api.webhooks.RedeliverEvent(wh.RedeliverEventRequest(endpoint_id=ep.endpoint_id, event_id=event_id + 10**9),
                                    metadata=api.md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    upd = api.webhooks.UpdateWebhookEndpoint(wh.UpdateWebhookEndpointRequest(
        endpoint=wh.WebhookEndpoint(endpoint_id=ep.endpoint_id, description="renamed", enabled=False)),
        metadata=api.md)
    assert upd.description == "renamed" and not upd.enabled
    with pytest.raises(grpc.RpcError) as e:
        api.webhooks.UpdateWebhookEndpoint(wh.UpdateWebhookEndpointRequest(
            endpoint=wh.WebhookEndpoint(endpoint_id=ep.endpoint_id), update_mask={"paths": ["secret"]}),
            metadata=api.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask" in violations(e.value)
    api.webhooks.DeleteWebhookEndpoint(wh.DeleteWebhookEndpointRequest(endpoint_id=ep.endpoint_id), metadata=api.md)
    with pytest.raises(grpc.RpcError) as e:
        api.webhooks.GetWebhookEndpoint(wh.GetWebhookEndpointRequest(endpoint_id=ep.endpoint_id), metadata=api.md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    actions = [a.action for a in api.audit.ListAuditEvents(aud.ListAuditEventsRequest(
        entity_type="webhook", entity_id=ep.endpoint_id), metadata=api.md).audit_events]
    assert actions == ["webhook.delete", "webhook.update", "webhook.redeliver", "webhook.test", "webhook.create"]


def test_redis_status_channels_keep_working(api: Ops, sandbox_url: str, stack_env: dict[str, str]) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    pubsub = redis.Redis.from_url(stack_env["REDIS_URL"]).pubsub()
    pubsub.subscribe(f"whago:campaign:{camp.id}:status")
    wait_for(lambda: pubsub.get_message(timeout=0.1) is not None, 5, "not subscribed")  # the confirmation
    api.start_sending(camp.id, 3)
    api.wait_final(camp.id)
    seen: list[dict[str, Any]] = []

    def got_completed() -> bool:
        msg = pubsub.get_message(timeout=0.2)
        if msg is not None and msg["type"] == "message":
            seen.append(json.loads(msg["data"]))
        return any(d["state"] == "COMPLETED" for d in seen)
    wait_for(got_completed, 20, lambda: f"no COMPLETED on the status channel: {seen}")
    assert all(d["event"] == "campaign.status" and d["campaign_id"] == camp.id for d in seen)
    started = [d for d in seen if d["type"] == "campaign.started"]
    assert started and started[0]["state"] == "RUNNING"
    assert [d["seq"] for d in seen] == sorted(d["seq"] for d in seen)


def test_watch_campaign_snapshot_events_and_resume(api: Ops, sandbox_url: str) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    api.import_phones(camp.id, [f"55119{n:08d}" for n in range(40_000_000, 40_000_008)])
    stream = api.campaigns.WatchCampaign(cs.WatchCampaignRequest(campaign_id=camp.id), metadata=api.md, timeout=60)
    first = next(stream)
    assert first.WhichOneof("kind") == "snapshot"
    assert first.snapshot.campaign.state == res.CAMPAIGN_STATE_DRAFT
    assert first.snapshot.seq == 2  # created, contacts imported
    api.start(camp.id)
    events = [m.event for m in stream]  # ends by itself at the final event
    assert events[0].type == "campaign.started" and events[-1].type == "campaign.completed"
    assert [e.seq for e in events] == list(range(3, 3 + len(events)))
    assert events[-1].data["sent_count"] == 8
    again = list(api.campaigns.WatchCampaign(cs.WatchCampaignRequest(campaign_id=camp.id, after_seq=3),
                                             metadata=api.md, timeout=30))
    assert again[0].snapshot.campaign.state == res.CAMPAIGN_STATE_COMPLETED
    assert [m.event.seq for m in again[1:]] == [e.seq for e in events[1:]]  # the resumed part, exactly
    for bad, code in ((cs.WatchCampaignRequest(campaign_id="nope"), grpc.StatusCode.INVALID_ARGUMENT),
                      (cs.WatchCampaignRequest(campaign_id="6f0c6bde-4a5c-4e0c-9d1e-1b2a3c4d5e6f"),
                       grpc.StatusCode.NOT_FOUND),
                      (cs.WatchCampaignRequest(campaign_id=camp.id, after_seq=-1), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            list(api.campaigns.WatchCampaign(bad, metadata=api.md, timeout=10))
        assert e.value.code() == code
    with pytest.raises(grpc.RpcError) as e:
        list(api.campaigns.WatchCampaign(cs.WatchCampaignRequest(campaign_id=camp.id), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_audit_trail_lists_every_mutation_and_outlives_the_campaign(api: Ops, sandbox_url: str) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(campaign=res.Campaign(id=camp.id, name="renamed"),
                                                          update_mask={"paths": ["name"]}), metadata=api.md)
    api.import_phones(camp.id, [f"55119{n:08d}" for n in range(41_000_000, 41_000_003)])
    api.start(camp.id)
    api.wait_final(camp.id)
    api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=camp.id), metadata=api.md)
    listed = api.audit.ListAuditEvents(aud.ListAuditEventsRequest(entity_type="campaign", entity_id=camp.id),
                                       metadata=api.md).audit_events
    assert [a.action for a in listed] == ["campaign.delete", "campaign.complete", "campaign.start",
                                          "campaign.import_contacts", "campaign.update", "campaign.create"]
    by = {a.action: a for a in listed}
    assert by["campaign.delete"].actor.startswith("user:") and by["campaign.complete"].actor == "system:delivery"
    assert by["campaign.delete"].extra["campaign_name"] == "renamed"
    page1 = api.audit.ListAuditEvents(aud.ListAuditEventsRequest(page_size=2), metadata=api.md)
    assert len(page1.audit_events) == 2 and page1.next_page_token
    page2 = api.audit.ListAuditEvents(aud.ListAuditEventsRequest(page_size=2, page_token=page1.next_page_token),
                                      metadata=api.md)
    assert page2.audit_events[0].audit_event_id < page1.audit_events[-1].audit_event_id
    chips = api.audit.ListAuditEvents(aud.ListAuditEventsRequest(entity_type="chip"), metadata=api.md).audit_events
    assert [a.action for a in chips] == ["chip.register"]
    for bad, field in ((aud.ListAuditEventsRequest(entity_type="planet"), "entity_type"),
                       (aud.ListAuditEventsRequest(entity_id="x"), "entity_id"),
                       (aud.ListAuditEventsRequest(page_token=page1.next_page_token, action="campaign.start"),
                        "page_token"),
                       (aud.ListAuditEventsRequest(page_token="%%%"), "page_token")):
        with pytest.raises(grpc.RpcError) as e:
            api.audit.ListAuditEvents(bad, metadata=api.md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in violations(e.value)


def test_the_guard_refuses_at_connection_time_too(receiver: Receiver) -> None:
    """A name is checked again when the relay connects (DNS may have changed since registration):
    with no allowlist, `localhost` resolving to loopback is refused before any byte is sent."""
    async def post(guard: URLGuard) -> int:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(guard), use_dns_cache=False)
        async with (aiohttp.ClientSession(connector=connector) as http,
                    http.post(f"http://localhost:{receiver.port}/hooks", data=b"{}") as resp):
            return resp.status

    with pytest.raises(aiohttp.ClientConnectorError):
        asyncio.run(post(URLGuard()))
    assert receiver.requests == []
    assert asyncio.run(post(URLGuard(parse_allowlist("127.0.0.0/8, ::1")))) == 200
    with pytest.raises(RefusedURL):
        URLGuard().check_literal("http://127.0.0.1:9/x")
