"""OpenTelemetry tracing of campaign_service, on only when an OTLP endpoint is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, OTLP over HTTP).

A span per RPC served, child of the caller's span when its W3C `traceparent` came in the metadata
(a worker's LeaseMessages/ReportDeliveries join the worker's slice trace), and a client span per
call to the dispatcher carrying the context on (StartCampaign -> StartDispatch is one trace). Off,
nothing is installed: no interceptor, no span, on the hot path. The SDK reads the standard
`OTEL_*` settings (service name, sampler, batch delays, headers)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_provider: TracerProvider | None = None


def enabled() -> bool:
    return _provider is not None


def setup() -> bool:
    """Install the tracer provider when an endpoint is configured; True when tracing is on."""
    global _provider
    if _provider is None and any(os.environ.get(v) for v in ENDPOINT_VARS):
        _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "campaign_service"}))
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(_provider)
    return _provider is not None


def shutdown() -> None:
    """Export what is still buffered (on the server's way out)."""
    if _provider is not None:
        _provider.shutdown()


@contextmanager
def _rpc_span(method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """The server span of one RPC (`/package.Service/Method`), current for the handler's code and
    child of the caller's context; ends with the status the handler set."""
    carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    service, _, name = method.lstrip("/").partition("/")
    with trace.get_tracer(__name__).start_as_current_span(
            method.lstrip("/"), context=propagate.extract(carrier), kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False, set_status_on_exception=False) as span:
        try:
            yield
        finally:
            code = context.code() if hasattr(context, "code") else None
            code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))


def traced(method: str, run: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """`run` (a sync handler) inside its RPC's span."""
    def run_traced(request: Any, context: Any) -> Any:
        with _rpc_span(method, context):
            return run(request, context)
    return run_traced


def traced_async(method: str, run: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """`run` (an async handler) inside its RPC's span."""
    async def run_traced(request: Any, context: Any) -> Any:
        with _rpc_span(method, context):
            return await run(request, context)
    return run_traced


def traced_stream(method: str, run: Callable[[Any, Any], AsyncIterator[Any]]
                  ) -> Callable[[Any, Any], AsyncIterator[Any]]:
    """`run` (a server-streaming handler) inside its RPC's span."""
    async def run_traced(request: Any, context: Any) -> AsyncIterator[Any]:
        with _rpc_span(method, context):
            async for item in run(request, context):
                yield item
    return run_traced


def client_channel(channel: grpc.Channel) -> grpc.Channel:
    """A channel whose calls are client spans carrying the trace context (as is, when off)."""
    if _provider is None:
        return channel
    out: grpc.Channel = grpcext.intercept_channel(channel, client_interceptor())  # the instrumentation's own
    return out
