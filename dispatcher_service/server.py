"""`python -m dispatcher_service.server`: DispatcherService over grpc.aio, with reflection, health,
keepalive and a graceful drain on SIGTERM; and, when DISPATCHER_WEBHOOK_LISTEN is set, the WAHA
webhook receiver (webhooks.py) on the same event loop."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from aiohttp import web
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dispatcher_service import config as config_mod
from dispatcher_service import eventloop, logs, metrics, tracing, webhooks
from dispatcher_service.delivery import DeliveryClient
from dispatcher_service.redis_conn import arq_client
from dispatcher_service.servicer import DispatcherServicer
from dispatcher_service.store import Store
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as pbg

log = logging.getLogger("dispatcher.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DispatcherService"].full_name

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_connection_idle_ms", 10 * 60_000),
]


async def serve(cfg: config_mod.Config) -> None:
    redis = arq_client(cfg.redis_url)
    if tracing.setup("dispatcher_service"):
        log.info("tracing on: spans exported over OTLP/HTTP")
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=tracing.server_interceptors())
    pbg.add_DispatcherServiceServicer_to_server(DispatcherServicer(cfg, redis), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    server.add_insecure_port(cfg.listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("DispatcherService listening on %s (redis %s, queue %s)", cfg.listen, cfg.redis_url, cfg.queue_name)
    if metrics.serve(cfg.metrics_listen) is not None:
        metrics.watch_queue(cfg.redis_url, cfg.queue_name)
    receiver: web.AppRunner | None = None
    delivery: DeliveryClient | None = None
    if cfg.webhook_listen:
        delivery = DeliveryClient(cfg.campaign_target, cfg.service_token)
        receiver = await webhooks.start(cfg.webhook_listen, delivery, cfg.webhook_hmac_key,
                                        Store(redis, cfg.queue_name))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", cfg.grace_seconds)
    await health.enter_graceful_shutdown()
    await server.stop(cfg.grace_seconds)
    if receiver is not None:
        await receiver.cleanup()
    if delivery is not None:
        await delivery.close()
    await redis.aclose()
    tracing.shutdown()
    log.info("stopped")


def main() -> None:
    cfg = config_mod.load()
    logs.setup(cfg.log_level)
    eventloop.run(serve(cfg))


if __name__ == "__main__":
    main()
