"""The proof of issue 14: events are trustworthy through failures. A real receiver verifies every
request with the reference Standard Webhooks library while it answers 500 to 30 % of them at
random and is down for a stretch mid-campaign, and campaign_service (which runs the relay) is
SIGKILLed and restarted once during the campaigns. Afterwards every event of the outbox reached the
receiver at least once, each stream's sequence arrived complete and in order, and no request was
unsigned or badly signed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable
from unittest import mock

import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from campaign_service import admin
from campaign_service.db.migrate import upgrade
from devstack.procs import ServiceProcess
from devstack.servers import Postgres, free_port
from tests.conftest import SANDBOX_API_KEY, IsolatedStack, ready_channel
from tests.helpers import Ops, wait_for
from tests.receiver import Receiver
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh


def new_user(url: str) -> str:
    buf = io.StringIO()
    with mock.patch.dict(os.environ, {"DATABASE_URL": url}), contextlib.redirect_stdout(buf):
        assert admin.main(["create-user", "--name", "proof", "--credits", "100000"]) == 0
    return buf.getvalue().strip().splitlines()[-1]


def test_every_event_delivered_signed_complete_and_in_order_through_crashes(
        postgres: Postgres, isolated_stack: Callable[..., IsolatedStack], sandbox_url: str) -> None:
    postgres.create_database("whago_events_proof")
    url = postgres.url("whago_events_proof")
    upgrade(url)
    # Its own database: this stack's campaign_service is the only relay, so killing it kills the relay.
    st = isolated_stack("events-proof", DATABASE_URL=url, WHAGO_WEBHOOK_SCHEDULE="0,0.3,0.6,1,2,4,4,4,4,4",
                        WHAGO_WEBHOOK_DISABLE_AFTER_SECONDS="600")  # the outage must not disable it
    api = Ops(st.campaign_channel, new_user(url))
    receiver = Receiver(seed=14)
    receiver.fail_ratio = 0.3
    receiver.start()
    try:
        secret = api.webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
            url=receiver.url, enabled=True)), metadata=api.md).secret
        chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.02, 0.04))
        camps = [api.campaign([chip], name=f"proof {i}") for i in range(2)]
        for i, c in enumerate(camps):
            api.import_phones(c.id, [f"55119{n:08d}" for n in range(50_000_000 + i * 1000, 50_000_000 + i * 1000 + 60)])
            api.start(c.id)
        api.wait(camps[0].id, lambda c: c.sent_count >= 10, 60)
        receiver.stop()  # down for a stretch
        time.sleep(1.5)
        receiver.start()
        api.wait(camps[0].id, lambda c: c.sent_count >= 25, 60)
        assert api.get(camps[1].id).state == res.CAMPAIGN_STATE_RUNNING  # the crash is mid-campaign
        st.campaign.kill()  # SIGKILL: no drain; the relay dies mid-flight
        time.sleep(0.5)
        st.campaign.start()
        for c in camps:
            api.wait_final(c.id, timeout=120)

        eng = sa.create_engine(url)
        try:
            with eng.connect() as conn:
                outbox = conn.execute(sa.text("SELECT id, stream, seq FROM events ORDER BY id")).all()
                pending = lambda: conn.execute(sa.text(  # noqa: E731
                    "SELECT count(*) FROM webhook_deliveries WHERE state <> 2")).scalar_one()
                wait_for(lambda: conn.execute(sa.text("SELECT count(*) FROM events WHERE relayed_at IS NULL"))
                         .scalar_one() == 0 and pending() == 0, 90, lambda: f"{pending()} deliveries not delivered")
                outbox = conn.execute(sa.text("SELECT id, stream, seq FROM events ORDER BY id")).all()
        finally:
            eng.dispose()
        hook = Webhook(secret)
        for req in receiver.requests:  # every request, also those we answered 500 to
            hook.verify(req.body, req.headers)
        got: dict[str, list[int]] = {}
        seen_ids = set()
        for req in receiver.delivered():
            body = json.loads(req.body)
            seen_ids.add(req.headers["webhook-id"])
            seqs = got.setdefault(body["data"]["stream"], [])
            if body["data"]["seq"] not in seqs:
                seqs.append(body["data"]["seq"])
        missing = [e.id for e in outbox if f"evt_{e.id}" not in seen_ids]
        assert not missing, f"{len(missing)} of {len(outbox)} events never delivered"
        for c in camps:
            seqs = got[f"campaign:{c.id}"]
            assert seqs == list(range(1, len(seqs) + 1)), seqs  # first receipts: complete and in order
            assert max(e.seq for e in outbox if e.stream == f"campaign:{c.id}") == len(seqs)
        failed = sum(1 for r in receiver.requests if r.answered >= 500)
        assert failed >= 0.15 * len(receiver.requests)  # the receiver really failed about 30 %
        assert len(outbox) >= 8
    finally:
        receiver.stop()
        st.stop()


def test_two_replicas_relay_each_event_once_and_a_standby_takes_over(
        postgres: Postgres, isolated_stack: Callable[..., IsolatedStack]) -> None:
    """Two campaign_service processes on one database: one relays (advisory lock), so a receiver
    that always answers 200 gets every event exactly once; SIGKILL the leader and the standby
    delivers what comes next."""
    postgres.create_database("whago_events_replicas")
    url = postgres.url("whago_events_replicas")
    upgrade(url)
    st = isolated_stack("events-replicas", DATABASE_URL=url)
    port = free_port()
    second = ServiceProcess("events-replicas-campaign-2", "campaign_service.server", [],
                            {**st.env, "CAMPAIGN_LISTEN": f"127.0.0.1:{port}"}, st.log_dir, port=port).start()
    receiver = Receiver().start()
    try:
        key = new_user(url)
        apis = [Ops(st.campaign_channel, key), Ops(ready_channel(port), key)]
        eid = apis[0].webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
            url=receiver.url, enabled=True)), metadata=apis[0].md).endpoint.endpoint_id
        for i in range(20):  # half through each replica
            apis[i % 2].webhooks.SendTestEvent(wh.SendTestEventRequest(endpoint_id=eid), metadata=apis[i % 2].md)
        wait_for(lambda: len(receiver.delivered()) >= 20, 30, lambda: f"{len(receiver.delivered())} of 20")
        time.sleep(1.0)  # room for a second delivery, should one be coming
        ids = [r.headers["webhook-id"] for r in receiver.delivered()]
        assert len(ids) == 20 and len(set(ids)) == 20  # each exactly once
        logs = st.campaign.tail(400) + second.tail(400)
        assert logs.count("relay leads") == 1, logs  # one leader for the two
        leader, standby, standby_api = ((st.campaign, second, apis[1]) if "relay leads" in st.campaign.tail(400)
                                        else (second, st.campaign, apis[0]))
        leader.kill()
        for _ in range(5):
            standby_api.webhooks.SendTestEvent(wh.SendTestEventRequest(endpoint_id=eid), metadata=standby_api.md)
        wait_for(lambda: len(receiver.delivered()) >= 25, 30, "the standby did not take over")
        assert "relay leads" in standby.tail(400)
    finally:
        receiver.stop()
        second.stop()
        st.stop()
