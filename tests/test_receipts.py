"""WhatsApp receipts end to end: the sandbox posts WAHA `message.ack` webhooks to the dispatcher's
receiver, which applies them through DeliveryService.ReportAcks: DELIVERED, then READ."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import urllib.error
import urllib.request

import aiohttp
import pytest

from devstack.procs import ServiceProcess
from devstack.servers import free_port
from dispatcher_service import webhooks
from dispatcher_service.delivery import DeliveryClient
from tests.conftest import SANDBOX_API_KEY, WEBHOOK_HMAC_KEY
from tests.helpers import Ops, phones, wait_for
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import resources_pb2 as res


@pytest.fixture()
def receiver_url(stack: dict[str, ServiceProcess], ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['webhooks']}/waha/webhook"


def post(url: str, event: object, key: str | None = WEBHOOK_HMAC_KEY) -> tuple[int, object]:
    body = json.dumps(event).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Webhook-Hmac"] = hmac.new(key.encode(), body, hashlib.sha512).hexdigest()
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_receipts_make_a_campaigns_messages_delivered_then_read(api: Ops, sandbox_url: str,
                                                               control: SandboxControl, receiver_url: str) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    camp = api.campaign([chip])
    api.import_phones(camp.id, phones(20))
    control.configure(webhooks=[{"url": receiver_url, "events": ["message.ack"], "hmac": {"key": WEBHOOK_HMAC_KEY}}],
                      acks={"delivered_after_ms": 50, "read_after_ms": 300, "read_rate": 1.0})
    try:
        api.start(camp.id)
        assert api.wait_final(camp.id, timeout=60).state == res.CAMPAIGN_STATE_COMPLETED
        done = api.wait(camp.id, lambda c: c.read_count == 20, timeout=30)
    finally:
        control.configure(webhooks=[])

    assert (done.sent_count, done.delivered_count, done.read_count, done.failed_count) == (20, 20, 20, 0)
    assert {m.state for m in api.messages(camp.id)} == {res.MESSAGE_STATE_READ}
    ours = {m["id"] for m in control.messages(session=chip.waha_session)}

    def posted() -> list[dict[str, object]]:
        return [w for w in control.webhooks() if w["message_id"] in ours]

    # The receiver answers once a receipt is applied, a moment before the sandbox logs that answer.
    wait_for(lambda: {w["status"] for w in posted()} == {200}, 10, lambda: f"deliveries logged as 200: {posted()}")
    assert sorted(w["ack"] for w in posted()) == [2] * 20 + [3] * 20  # type: ignore[type-var]


def test_receiver_checks_the_signature_and_ignores_what_is_not_a_receipt_of_ours(receiver_url: str) -> None:
    ack = {"event": "message.ack", "session": "s", "timestamp": 1700000000000,
           "payload": {"id": "true_5511999990001@c.us_3EB0FFFFFFFFFFFFFFFFFF", "fromMe": True, "ack": 3}}
    assert post(receiver_url, ack, key=None)[0] == 401
    assert post(receiver_url, ack, key="another key")[0] == 401
    assert post(receiver_url, ack) == (200, {"ok": True})  # no message carries that id: nothing to do
    assert post(receiver_url, {**ack, "event": "message.revoked"})[1] == {"ignored": "not a message.ack event"}
    for payload in ({**ack["payload"], "fromMe": False}, {**ack["payload"], "ack": 1}, {"fromMe": True, "ack": 2}):
        status, out = post(receiver_url, {**ack, "payload": payload})
        assert status == 200 and "ignored" in out, payload  # type: ignore[operator]
    req = urllib.request.Request(receiver_url, data=b"{nope", method="POST", headers={
        "X-Webhook-Hmac": hmac.new(WEBHOOK_HMAC_KEY.encode(), b"{nope", hashlib.sha512).hexdigest()})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


def test_receiver_answers_503_when_the_campaign_service_is_down_so_waha_retries() -> None:
    """A receipt is answered only once applied: with DeliveryService unreachable, 503 (WAHA retries)."""
    async def run() -> int:
        delivery = DeliveryClient(f"127.0.0.1:{free_port()}", "token", call_timeout=1.0, retry_budget=0.5)
        port = free_port()
        runner = await webhooks.start(f"127.0.0.1:{port}", delivery, "")
        try:
            async with aiohttp.ClientSession() as http, http.post(
                    f"http://127.0.0.1:{port}{webhooks.PATH}", json={
                        "event": "message.ack", "payload": {"id": "true_1@c.us_3EB0AA", "fromMe": True, "ack": 2}},
                    timeout=aiohttp.ClientTimeout(total=15)) as resp:
                return resp.status
        finally:
            await runner.cleanup()
            await delivery.close()

    assert asyncio.run(run()) == 503
