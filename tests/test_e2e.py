"""End to end through every real part: campaign_service on PostgreSQL, dispatcher_service and its
arq worker on Redis, and the WAHA sandbox over HTTP."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import grpc

from tests.conftest import SANDBOX_API_KEY
from tests.helpers import Api, phones
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res


def test_200_contacts_over_3_chips_complete_each_contact_once_split_round_robin(
        api: Api, sandbox_url: str, control: SandboxControl) -> None:
    chips = [api.chip(sandbox_url, SANDBOX_API_KEY) for _ in range(3)]
    camp = api.campaign(chips)
    numbers = phones(200)
    imported = api.import_phones(camp.id, numbers)
    assert imported.imported_count == 200
    api.start(camp.id)

    done = api.wait_final(camp.id, timeout=120)

    assert done.state == res.CAMPAIGN_STATE_COMPLETED
    assert done.sent_count == 200 and done.failed_count == 0 and done.pending_count == 0
    assert done.HasField("complete_time")
    sends = [s for c in chips for s in control.sends(session=c.waha_session)]
    assert len(sends) == 200
    per_chat = collections.Counter(s["chat_id"] for s in sends)
    expected = {"55119" + p.replace(" ", "")[-8:] + "@c.us" for p in numbers}
    assert set(per_chat) == expected
    assert max(per_chat.values()) == 1
    per_session = sorted(collections.Counter(s["session"] for s in sends).values())
    assert per_session == [66, 67, 67]
    msgs = api.campaigns.ListCampaignMessages(cs.ListCampaignMessagesRequest(
        campaign_id=camp.id, page_size=1000), metadata=api.md).messages
    assert len(msgs) == 200
    assert all(m.state == res.MESSAGE_STATE_SENT and m.waha_message_id for m in msgs)


def test_pause_stops_sending_and_resume_sends_only_the_rest(
        api: Api, sandbox_url: str, control: SandboxControl) -> None:
    chips = [api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.02, 0.05)) for _ in range(2)]
    camp = api.campaign(chips, interval=(0.02, 0.05))
    api.start_sending(camp.id, 120, sent_at_least=20, timeout=60)

    paused = api.pause(camp.id)
    t_paused = time.time()

    assert paused.state == res.CAMPAIGN_STATE_PAUSED
    time.sleep(1.5)
    sessions = {c.waha_session for c in chips}
    after = [r for r in control.requests(since=t_paused) if r.get("session") in sessions]
    assert after == [], f"WAHA got {len(after)} requests after PauseCampaign returned"
    mid = api.get(camp.id)
    assert mid.state == res.CAMPAIGN_STATE_PAUSED and 0 < mid.sent_count < 120

    api.resume(camp.id)
    done = api.wait_final(camp.id, timeout=120)

    assert done.state == res.CAMPAIGN_STATE_COMPLETED and done.sent_count == 120
    sends = [s for c in chips for s in control.sends(session=c.waha_session)]
    per_chat = collections.Counter(s["chat_id"] for s in sends)
    assert len(per_chat) == 120 and max(per_chat.values()) == 1


def test_buf_curl_lists_services_by_reflection_and_calls_list_campaigns(
        api: Api, ports: dict[str, int], api_key: str, run_buf: Callable[..., str]) -> None:
    target = f"http://127.0.0.1:{ports['campaign']}"
    listed = run_buf("curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", target)
    assert "whago.campaign.v1.CampaignService" in listed
    assert "whago.campaign.v1.ChipService" in listed
    api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name="seen by buf", templates=[res.MessageTemplate(text="hi")])), metadata=api.md)
    out = run_buf("curl", "--protocol", "grpc", "--http2-prior-knowledge",
                  "-H", f"authorization: Bearer {api_key}", "-d", '{"page_size": 10}',
                  f"{target}/whago.campaign.v1.CampaignService/ListCampaigns")
    assert "seen by buf" in out


def test_both_servers_report_serving_on_grpc_health(campaign_channel: grpc.Channel,
                                                    dispatcher_channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for ch in (campaign_channel, dispatcher_channel):
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
