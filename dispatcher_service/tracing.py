"""OpenTelemetry tracing of the dispatcher and its workers, on only when an OTLP endpoint is
configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, OTLP over HTTP).

The dispatcher API: a server span per RPC (child of campaign_service's client span, so a
StartCampaign and its StartDispatch are one trace). A worker: a span per lane slice, whose
LeaseMessages / ReportDeliveries / ReportChipState calls are client spans carrying the context to
campaign_service. Off, nothing is installed. The SDK reads the standard `OTEL_*` settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_provider: TracerProvider | None = None


def setup(program: str) -> bool:
    """Install the tracer provider for `program` (dispatcher_service, dispatcher_worker) when an
    endpoint is configured; True when tracing is on."""
    global _provider
    if _provider is None and any(os.environ.get(v) for v in ENDPOINT_VARS):
        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: program}))
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(_provider)
    return _provider is not None


def shutdown() -> None:
    """Export what is still buffered (on the way out)."""
    if _provider is not None:
        _provider.shutdown()


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [aio_server_interceptor()] if _provider is not None else []


def client_interceptors() -> list[Any]:
    return list(aio_client_interceptors()) if _provider is not None else []


@contextmanager
def slice_span(campaign_id: str, chip_id: str, epoch: int, job_id: str) -> Iterator[None]:
    """One lane slice (a no-op span when tracing is off)."""
    with trace.get_tracer(__name__).start_as_current_span(
            "lane.slice", attributes={"whago.campaign_id": campaign_id, "whago.chip_id": chip_id,
                                      "whago.epoch": epoch, "whago.job_id": job_id}):
        yield
