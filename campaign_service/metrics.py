"""Prometheus metrics of campaign_service: every metric of this program is defined here, and the
rest of the code calls the small functions below (one call per event), so the names, labels and
buckets live in one place. Served on CAMPAIGN_METRICS_LISTEN (host:port, empty = off) by
`serve()`.

Hot paths only touch pre-bound prometheus-client children (a dict lookup and an add): no I/O,
no extra locks of ours."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    start_http_server,
)

log = logging.getLogger("campaign_service.metrics")

#: This program's own registry (not prometheus-client's global one): the tests import both programs'
#: modules into one process, where the same metric names would collide.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

#: RPC latency buckets (seconds): sub-millisecond reads up to slow imports.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed by the server, by method and status code.",
                      ["grpc_service", "grpc_method", "grpc_code"], registry=REGISTRY)
RPC_SECONDS = Histogram("grpc_server_handling_seconds", "Time from the handler's start to its status, by method "
                        "and status code (streams: the stream's whole life).",
                        ["grpc_service", "grpc_method", "grpc_code"], buckets=RPC_BUCKETS, registry=REGISTRY)

WEBHOOK_DELIVERIES = Counter("whago_webhook_deliveries_total", "Webhook delivery attempts by outcome: delivered "
                             "(2xx), retried (will be tried again), dead_lettered (no more tries).", ["outcome"],
                             registry=REGISTRY)
WEBHOOK_SECONDS = Histogram("whago_webhook_attempt_seconds", "Duration of one webhook POST (any outcome).",
                            buckets=WEBHOOK_BUCKETS, registry=REGISTRY)
WEBHOOK_DISABLED = Counter("whago_webhook_endpoints_disabled_total",
                           "Endpoints disabled after failing for WHAGO_WEBHOOK_DISABLE_AFTER_SECONDS.",
                           registry=REGISTRY)

LEASED = Counter("whago_delivery_leased_messages_total", "Messages handed to lanes by LeaseMessages and LeaseLanes.",
                 registry=REGISTRY)
LEASES = Counter("whago_delivery_leases_total", "Lane leases taken, empty ones included: one a LeaseMessages call, "
                 "one a lane of a LeaseLanes call (leases over calls: how well a worker coalesces them).",
                 registry=REGISTRY)
LEASE_TAKEOVERS = Counter("whago_delivery_lease_takeovers_total", "Messages whose lease had expired (a crashed or "
                          "slow lane's) and were leased again by a lane.", registry=REGISTRY)
SCHEDULER_ACTIONS = Counter("whago_scheduler_actions_total", "Delivery scheduler actions: started (scheduled "
                            "start), swept (chip out of rotation: leases back / redistributed), completed, "
                            "watchdog_restart (lanes silent with work left, dispatch restarted).", ["action"],
                            registry=REGISTRY)

_WEBHOOK_OUTCOMES = {o: WEBHOOK_DELIVERIES.labels(o) for o in ("delivered", "retried", "dead_lettered")}
_SCHEDULER = {a: SCHEDULER_ACTIONS.labels(a) for a in ("started", "swept", "completed", "watchdog_restart")}


def serve(listen: str) -> int | None:
    """Start the /metrics HTTP endpoint on `listen` (host:port; port 0 picks one, logged); None when
    `listen` is empty. A port that cannot be bound is logged, not fatal: metrics never stop the service."""
    if not listen.strip():
        return None
    host, _, port = listen.rpartition(":")
    try:
        httpd, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)
    except (OSError, ValueError) as exc:
        log.error("metrics endpoint not started on %s: %s", listen, exc)
        return None
    bound = int(httpd.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
    return bound


class RpcObserver:
    """One method's RPC metrics: the children per status code are bound once, so an RPC costs a
    dict lookup, a counter add and a histogram observe."""

    __slots__ = ("_children", "_method", "_service")

    def __init__(self, full_method: str) -> None:
        parts = full_method.strip("/").split("/")
        self._service = parts[0] if len(parts) == 2 else ""
        self._method = parts[-1]
        self._children: dict[grpc.StatusCode, tuple[Any, Any]] = {}

    def done(self, code: grpc.StatusCode, started: float) -> None:
        """Record one RPC that ended with `code`; `started` is a time.perf_counter() value."""
        c = self._children.get(code)
        if c is None:
            labels = (self._service, self._method, code.name)
            c = self._children[code] = (RPC_HANDLED.labels(*labels), RPC_SECONDS.labels(*labels))
        c[0].inc()
        c[1].observe(time.perf_counter() - started)


def webhook_attempt(ok: bool, retry_in: float | None, seconds: float) -> None:
    """One webhook POST finished (see relay.service._attempt for what `retry_in` means)."""
    _WEBHOOK_OUTCOMES["delivered" if ok else "retried" if retry_in is not None else "dead_lettered"].inc()
    WEBHOOK_SECONDS.observe(seconds)


def webhook_endpoints_disabled(n: int) -> None:
    if n:
        WEBHOOK_DISABLED.inc(n)


def leases(n: int) -> None:
    """`n` lane leases were committed (one call)."""
    LEASES.inc(n)


def leased(n: int, taken_over: int) -> None:
    """A lane's lease handed out `n` messages, `taken_over` of them from expired leases."""
    if n:
        LEASED.inc(n)
    if taken_over:
        LEASE_TAKEOVERS.inc(taken_over)


def scheduler_tick(started: Sequence[str], swept: Sequence[str], completed: Sequence[str],
                   kicked: Sequence[str]) -> None:
    """What one pass of the delivery scheduler did (lists of campaign ids)."""
    for action, ids in (("started", started), ("swept", swept), ("completed", completed),
                        ("watchdog_restart", kicked)):
        if ids:
            _SCHEDULER[action].inc(len(ids))
