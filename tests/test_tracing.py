"""OpenTelemetry tracing through the real processes: a campaign's spans reach an OTLP/HTTP receiver
(a real HTTP server here), StartCampaign -> StartDispatch is one trace across campaign_service and
the dispatcher, and a worker's lane slice -> LeaseLanes is one trace across the worker and
campaign_service (W3C trace context in the gRPC metadata)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import Ops, wait_for
from whago.campaign.v1 import resources_pb2 as res


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class OtlpReceiver:
    """POST /v1/traces (OTLP protobuf over HTTP) on 127.0.0.1; keeps every span."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = ExportTraceServiceRequest.FromString(body)
                got = []
                for rs in req.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes
                                    if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        got += [Span(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex())
                                for s in ss.spans]
                with lock:
                    spans.extend(got)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def find(self, service: str, name_end: str) -> list[Span]:
        return [s for s in list(self.spans) if s.service == service and s.name.endswith(name_end)]


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def traced_stack(isolated_stack: Callable[..., IsolatedStack], otlp: OtlpReceiver) -> Iterator[IsolatedStack]:
    with isolated_stack("tracing", workers=1, OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
                        OTEL_BSP_SCHEDULE_DELAY="100") as st:
        yield st


def test_a_campaign_is_traced_across_the_services(traced_stack: IsolatedStack, otlp: OtlpReceiver, api_key: str,
                                                  sandbox_url: str) -> None:
    ops = Ops(traced_stack.campaign_channel, api_key)
    camp = ops.campaign([ops.chip(sandbox_url, SANDBOX_API_KEY)])
    ops.start_sending(camp.id, 3)
    assert ops.wait_final(camp.id).state == res.CAMPAIGN_STATE_COMPLETED

    def start_traced() -> bool:
        starts = otlp.find("campaign_service", "CampaignService/StartCampaign")
        dispatches = otlp.find("dispatcher_service", "DispatcherService/StartDispatch")
        return any(d.trace_id == s.trace_id for s in starts for d in dispatches)

    wait_for(start_traced, timeout=20, what="StartCampaign and its StartDispatch in one trace")
    [start] = otlp.find("campaign_service", "CampaignService/StartCampaign")
    assert start.parent_id == ""  # the test's call carried no context: a root span

    def slice_traced() -> bool:
        slices = {s.trace_id for s in otlp.find("dispatcher_worker", "lane.slice")}
        return any(lease.trace_id in slices for lease in otlp.find("campaign_service", "DeliveryService/LeaseLanes"))

    wait_for(slice_traced, timeout=20, what="a lane slice and its LeaseLanes in one trace")
    lease = next(x for x in otlp.find("campaign_service", "DeliveryService/LeaseLanes")
                 if x.trace_id in {s.trace_id for s in otlp.find("dispatcher_worker", "lane.slice")})
    assert lease.parent_id, "the server span is the child of the worker's client span"
