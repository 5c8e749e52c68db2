"""Prometheus metrics of every program, scraped over HTTP during a real campaign: campaign_service
(RPCs, leases, webhook deliveries), the dispatcher server (RPCs, arq queue depth) and a worker on
port 0 (messages, lanes, pacing waits). Its own database, so this stack's campaign_service is the
only relay and scheduler there: the webhook counters it exports are all of them."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Iterator
from unittest import mock

import grpc
import pytest

from campaign_service import admin
from campaign_service.db.migrate import upgrade
from devstack.servers import Postgres, free_port
from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import (
    CAMPAIGN_SVC,
    DELIVERY_SVC,
    DISPATCHER_SVC,
    Ops,
    logged_port,
    phones,
    rpcs,
    scrape,
    value,
    wait_for,
)
from tests.receiver import Receiver
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import webhook_service_pb2 as wh

N = 12


def new_user(url: str) -> str:
    buf = io.StringIO()
    with mock.patch.dict(os.environ, {"DATABASE_URL": url}), contextlib.redirect_stdout(buf):
        assert admin.main(["create-user", "--name", "metrics", "--credits", "100000"]) == 0
    return buf.getvalue().strip().splitlines()[-1]


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_every_endpoint_moves_during_a_campaign(postgres: Postgres, isolated_stack: Callable[..., IsolatedStack],
                                                sandbox_url: str, receiver: Receiver) -> None:
    postgres.create_database("whago_metrics")
    url = postgres.url("whago_metrics")
    upgrade(url)
    cport, dport = free_port(), free_port()
    st = isolated_stack("metrics", workers=0, DATABASE_URL=url, CAMPAIGN_METRICS_LISTEN=f"127.0.0.1:{cport}",
                        DISPATCHER_METRICS_LISTEN=f"127.0.0.1:{dport}")
    worker = st.start_worker(WORKER_METRICS_LISTEN="127.0.0.1:0")  # several workers on one host: port 0
    wport = logged_port(worker)
    st.campaign.wait_logged("metrics on http://", timeout=30)
    st.dispatcher.wait_logged("metrics on http://", timeout=30)

    api = Ops(st.campaign_channel, new_user(url))
    api.webhooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
        url=receiver.url, enabled=True)), metadata=api.md)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(0.25, 0.25))
    camp = api.campaign([chip], interval=(0.25, 0.25))  # ~3 s of paced sends: the lane is seen running
    api.import_phones(camp.id, phones(N))
    with pytest.raises(grpc.RpcError) as e:
        api.get("00000000-0000-0000-0000-000000000000")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    c0, d0, w0 = scrape(cport), scrape(dport), scrape(wport)
    assert rpcs(c0, CAMPAIGN_SVC, "GetCampaign", "NOT_FOUND") >= 1  # errors are counted by their code
    assert rpcs(c0, CAMPAIGN_SVC, "ImportContacts") >= 1  # a client stream, run on the thread pool
    assert value(c0, "whago_webhook_deliveries_total", outcome="delivered") >= 1  # campaign.created/updated
    assert value(w0, "whago_lanes_running") == 0

    api.start(camp.id)
    wait_for(lambda: value(scrape(wport), "whago_lanes_running") > 0, 20, "a running lane in the worker's gauge")
    wait_for(lambda: value(scrape(dport), "whago_arq_queue_jobs", queue="whago:dispatch") >= 1, 20,
             "the lane's job in the arq queue depth")  # a running job stays in arq's queue
    done = api.wait_final(camp.id, timeout=60)
    assert done.sent_count == N
    wait_for(lambda: value(scrape(wport), "whago_lanes_running") == 0, 20, "the lanes gauge back to 0")

    c1, d1, w1 = scrape(cport), scrape(dport), scrape(wport)
    # campaign_service: public and internal RPCs, count and latency histogram agree.
    assert rpcs(c1, CAMPAIGN_SVC, "StartCampaign") == rpcs(c0, CAMPAIGN_SVC, "StartCampaign") + 1
    assert rpcs(c1, DELIVERY_SVC, "LeaseLanes") > rpcs(c0, DELIVERY_SVC, "LeaseLanes")
    assert rpcs(c1, DELIVERY_SVC, "ReportDeliveries") > rpcs(c0, DELIVERY_SVC, "ReportDeliveries")
    assert value(c1, "grpc_server_handling_seconds_count", grpc_service=CAMPAIGN_SVC, grpc_method="StartCampaign",
                 grpc_code="OK") == rpcs(c1, CAMPAIGN_SVC, "StartCampaign")
    assert value(c1, "whago_delivery_leased_messages_total") - value(c0, "whago_delivery_leased_messages_total") >= N
    leases = value(c1, "whago_delivery_leases_total") - value(c0, "whago_delivery_leases_total")
    assert leases >= rpcs(c1, DELIVERY_SVC, "LeaseLanes") - rpcs(c0, DELIVERY_SVC, "LeaseLanes") > 0
    # dispatcher server
    assert rpcs(d1, DISPATCHER_SVC, "StartDispatch") == rpcs(d0, DISPATCHER_SVC, "StartDispatch") + 1
    # worker: the sent counter is exactly the campaign's sent messages; paced, so it waited.
    assert value(w1, "whago_messages_sent_total") - value(w0, "whago_messages_sent_total") == N
    assert sum(v for (name, _), v in w1.items() if name == "whago_messages_failed_total") == 0
    assert value(w1, "whago_pacing_wait_seconds_count") > 0
    assert value(w1, "whago_pacing_wait_seconds_sum") > 0
    assert value(w1, "whago_lane_slices_total", outcome="finished") >= 1
    # exported although this campaign had none (no crash, no stalled lane)
    for samples, name in ((w1, "whago_arq_job_retries_total"), (c1, "whago_delivery_lease_takeovers_total")):
        assert (name, frozenset()) in samples, name
    # webhooks: the campaign's events reached the receiver, and the counter followed.
    wait_for(lambda: value(scrape(cport), "whago_webhook_deliveries_total", outcome="delivered")
             >= value(c0, "whago_webhook_deliveries_total", outcome="delivered") + 2, 20,
             "webhook deliveries of campaign.started / .completed counted")
    assert value(scrape(cport), "whago_webhook_deliveries_total", outcome="delivered") == len(receiver.delivered())
    api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=1), metadata=api.md)
    assert rpcs(scrape(cport), CAMPAIGN_SVC, "ListCampaigns") == rpcs(c1, CAMPAIGN_SVC, "ListCampaigns") + 1
    st.stop()  # (on a failure, the session's end stops it)


def test_metrics_are_off_without_a_listen_address() -> None:
    """Empty = off, for every program (the tests' and bench's default stacks serve none)."""
    from campaign_service import metrics as cm
    from dispatcher_service import metrics as dm

    assert cm.serve("") is None
    assert dm.serve("  ") is None


def test_the_grafana_dashboard_uses_only_exported_metrics() -> None:
    """deploy/grafana/whago.json: valid JSON whose every query names a metric one program exports
    (a renamed metric would leave an empty panel)."""
    import json
    from pathlib import Path

    from campaign_service import metrics as cm
    from dispatcher_service import metrics as dm

    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "whago.json").read_text())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {fam.name + sfx for reg in (cm.REGISTRY, dm.REGISTRY) for fam in reg.collect()
                for sfx in suffixes.get(fam.type, ())}
    exported |= {"whago_arq_queue_jobs", "whago_arq_queue_due_jobs"}  # read from Redis when scraped
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 10
    for expr in exprs:
        for name in re.findall(r"\b((?:whago|grpc_server)_[a-z_]+)", expr):
            assert name in exported, f"{name} in {expr!r} is not exported"
