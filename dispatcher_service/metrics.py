"""Prometheus metrics of the dispatcher's two programs: every metric is defined here and the rest of
the code calls the small functions below (one call per event). The server
(`dispatcher_service.server`) serves them on DISPATCHER_METRICS_LISTEN, each arq worker on
WORKER_METRICS_LISTEN (host:port; port 0 picks a free one and logs it; empty = off). Both export
every metric defined here and each moves only its own (the server: RPCs; workers: messages, lanes,
pacing, retries); the arq queue depth is the server's, read from Redis at scrape time (no polling
loop, no per-message Redis calls).

Hot paths (a message's outcome, a pacing wait) touch pre-bound prometheus-client children only."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc
import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from whago.campaign.v1 import delivery_service_pb2 as dpb

log = logging.getLogger("dispatcher.metrics")

#: This program's own registry (not prometheus-client's global one): the tests import both programs'
#: modules into one process, where the same metric names would collide.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PACING_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

# -- dispatcher server ---------------------------------------------------------------------------------
RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed by the server, by method and status code.",
                      ["grpc_service", "grpc_method", "grpc_code"], registry=REGISTRY)
RPC_SECONDS = Histogram("grpc_server_handling_seconds", "Time from the handler's start to its status, by method "
                        "and status code.", ["grpc_service", "grpc_method", "grpc_code"], buckets=RPC_BUCKETS,
                        registry=REGISTRY)

# -- workers ---------------------------------------------------------------------------------------------
SENT = Counter("whago_messages_sent_total", "Messages WAHA accepted (outcome SENT, incl. sends confirmed by a "
               "lookup after an uncertain answer).", registry=REGISTRY)
FAILED = Counter("whago_messages_failed_total", "Messages that did not go out, by reason: rejected (WAHA 4xx), "
                 "retries_exhausted, waha_error, outcome_unknown (never resent blindly), not_on_whatsapp "
                 "(SKIPPED).", ["reason"], registry=REGISTRY)
RELEASED = Counter("whago_messages_released_total", "Leased messages handed back unsent (lane stopped, slice over, "
                   "chip down); they are sent later or by another lane.", registry=REGISTRY)
LANES = Gauge("whago_lanes_running", "Lane slices running in this worker (holding their lane lock).", registry=REGISTRY)
SLICES = Counter("whago_lane_slices_total", "Lane slices ended, by outcome (finished, slice, stopped, busy, "
                 "backoff, chip_failed, error, cancelled).", ["outcome"], registry=REGISTRY)
PACING_WAIT = Histogram("whago_pacing_wait_seconds", "Waits of a lane for its chip's pacing slot (gap, hourly/daily "
                        "cap, sending window) before a send; _count = waits, _sum = seconds waited.",
                        buckets=PACING_BUCKETS, registry=REGISTRY)
JOB_RETRIES = Counter("whago_arq_job_retries_total", "arq jobs run again (job_try > 1): a crashed, timed-out or "
                      "shut-down worker's lane slice taken over.", registry=REGISTRY)
TAKEOVERS = Counter("whago_lane_takeovers_total", "Lanes this worker's supervisor claimed after their owner's "
                    "heartbeat lapsed (takeover slice enqueued).", registry=REGISTRY)

_FAILED = {r: FAILED.labels(r) for r in ("rejected", "retries_exhausted", "waha_error", "outcome_unknown",
                                         "not_on_whatsapp")}
_SENT, _FAILED_OUTCOMES = dpb.DELIVERY_OUTCOME_SENT, (dpb.DELIVERY_OUTCOME_FAILED, dpb.DELIVERY_OUTCOME_UNKNOWN,
                                                      dpb.DELIVERY_OUTCOME_SKIPPED)


def serve(listen: str) -> int | None:
    """Start the /metrics HTTP endpoint on `listen` (host:port; port 0 picks one, logged); None when
    `listen` is empty. A port that cannot be bound is logged, not fatal: metrics never stop sending."""
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
    """One method's RPC metrics, children bound once per status code."""

    __slots__ = ("_children", "_method", "_service")

    def __init__(self, service: str, method: str) -> None:
        self._service, self._method = service, method
        self._children: dict[grpc.StatusCode, tuple[Any, Any]] = {}

    def done(self, code: grpc.StatusCode, started: float) -> None:
        """Record one RPC that ended with `code`; `started` is a time.perf_counter() value."""
        c = self._children.get(code)
        if c is None:
            labels = (self._service, self._method, code.name)
            c = self._children[code] = (RPC_HANDLED.labels(*labels), RPC_SECONDS.labels(*labels))
        c[0].inc()
        c[1].observe(time.perf_counter() - started)


def message_outcome(outcome: int, reason: str) -> None:
    """A message's final outcome in a lane (ReportingLane.final). The reason text is mapped to a
    few fixed labels (it carries WAHA's answer, which must not become a label)."""
    if outcome == _SENT:
        SENT.inc()
    elif outcome == dpb.DELIVERY_OUTCOME_RELEASED:
        RELEASED.inc()
    elif outcome in _FAILED_OUTCOMES:
        _FAILED[_failure_reason(outcome, reason)].inc()


def _failure_reason(outcome: int, reason: str) -> str:
    if outcome == dpb.DELIVERY_OUTCOME_UNKNOWN:
        return "outcome_unknown"
    if outcome == dpb.DELIVERY_OUTCOME_SKIPPED:
        return "not_on_whatsapp"
    if reason.startswith("WAHA rejected"):
        return "rejected"
    if reason.startswith("WAHA failed after"):
        return "retries_exhausted"
    return "waha_error"


def pacing_wait(seconds: float) -> None:
    """A lane is about to sleep `seconds` for its pacing slot (nothing recorded for no wait)."""
    if seconds > 0:
        PACING_WAIT.observe(seconds)


def slice_ended(outcome: str) -> None:
    SLICES.labels(outcome).inc()


def job_started(job_try: int) -> None:
    """An arq lane job starts; tries after the first are takeovers of an unfinished run."""
    if job_try > 1:
        JOB_RETRIES.inc()


class QueueDepth(Collector):
    """arq queue depth, read from Redis when scraped (ZCARD / ZCOUNT of the queue's sorted set, whose
    scores are due times in ms): all jobs (queued, deferred and running, since a running job stays
    in the set) and those due now. A scrape while Redis is down just leaves them out."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcard(self._queue)
            pipe.zcount(self._queue, "-inf", int(time.time() * 1000))
            total, due = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("queue depth not read: %s", exc)
            return
        jobs = GaugeMetricFamily("whago_arq_queue_jobs", "Jobs in the arq queue (queued, deferred or running).",
                                 labels=["queue"])
        jobs.add_metric([self._queue], total)
        yield jobs
        ready = GaugeMetricFamily("whago_arq_queue_due_jobs", "Jobs in the arq queue whose time has come (running "
                                  "or waiting for a worker).", labels=["queue"])
        ready.add_metric([self._queue], due)
        yield ready


def watch_queue(redis_url: str, queue: str) -> None:
    """Export the arq queue depth from this process (the dispatcher server)."""
    REGISTRY.register(QueueDepth(redis_url, queue))
