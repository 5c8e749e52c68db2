"""`python -m campaign_service.server`: CampaignService, ChipService, WebhookService, AuditService,
CreditService and the internal DeliveryService on one grpc.aio server, with reflection and
grpc.health.v1; the delivery scheduler thread; the event relay and the WatchCampaign hub as asyncio tasks.

The unary handlers are plain functions run on the RPC thread pool (grpc.aio's migration pool),
except GetCampaign and ListCampaigns, coroutines reading through asyncpg (campaign_service.db.aio);
WatchCampaign is a coroutine on the event loop, so a thousand watchers cost no thread. Every
service registers into one `Handlers` (campaign_service.handlers), which wraps each method once
(campaign_service.interceptors) and is the server's only generic handler.

SIGTERM/SIGINT: health goes NOT_SERVING, watchers are told to reconnect, in-flight RPCs get
`grace` seconds, the engine is disposed."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from campaign_service import config, limits, logs, metrics, tracing
from campaign_service.db.aio import asyncpg_dsn
from campaign_service.db.engine import Database
from campaign_service.delivery import scheduler as delivery_scheduler
from campaign_service.delivery import servicer as delivery_servicer
from campaign_service.dispatch import DispatcherClient
from campaign_service.handlers import Handlers
from campaign_service.interceptors import KeyCache, RpcWrapper
from campaign_service.limits import RateLimiter
from campaign_service.ops import Operations
from campaign_service.relay.listener import Listener
from campaign_service.relay.service import Relay
from campaign_service.repository import users as users_repo
from campaign_service.rpc_pool import ElasticThreadPool
from campaign_service.secrets_box import SecretBox
from campaign_service.servicers import audit as audit_servicer
from campaign_service.servicers import campaigns as campaigns_servicer
from campaign_service.servicers import chips as chips_servicer
from campaign_service.servicers import credits as credits_servicer
from campaign_service.servicers import suppressions as suppressions_servicer
from campaign_service.servicers import webhooks as webhooks_servicer
from campaign_service.sweeps import Sweeper
from campaign_service.watch import WatchHub
from whago.campaign.v1 import (
    audit_service_pb2,
    campaign_service_pb2,
    chip_service_pb2,
    credit_service_pb2,
    delivery_service_pb2,
    suppression_service_pb2,
    webhook_service_pb2,
)

log = logging.getLogger("campaign_service.server")

GRACE_SECONDS = 10.0
MAX_MESSAGE_BYTES = 20 * 1024 * 1024  # UploadMedia carries up to 16 MiB of content

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_connection_idle_ms", 15 * 60_000),
]

SERVICE_NAMES = (
    campaign_service_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name,
    chip_service_pb2.DESCRIPTOR.services_by_name["ChipService"].full_name,
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
    suppression_service_pb2.DESCRIPTOR.services_by_name["SuppressionService"].full_name,
)
DELIVERY_SERVICE = delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name


class App:
    """The wired-up server: build with `App(settings)` inside the event loop, then `await start()`,
    `await stop()`."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url, settings.db_pool_size, settings.db_prepared_statements)
        self.dispatcher = DispatcherClient(settings.dispatcher_target, settings.service_token,
                                           settings.dispatcher_timeout)
        SecretBox(settings.secret_keys)  # fail fast: without the keys no chip could be registered or dispatched
        self.ops = Operations.create(self.db, settings, self.dispatcher)
        self.keys = KeyCache(self._lookup_key)
        self.pool = ElasticThreadPool(settings.core_workers, settings.max_workers, thread_name_prefix="rpc")
        # Database work of the relay and the watch hub, apart from the RPC threads.
        self.background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="events")
        self.hub = WatchHub(self.db, self.background)
        self.relay = Relay(self.db, settings, self.background)
        self.listener: Listener | None = None
        self.server = grpc.aio.server(migration_thread_pool=self.pool, options=SERVER_OPTIONS,
                                      maximum_concurrent_rpcs=settings.max_workers * 64)
        # Every service registers into `handlers`, which wraps each method once (auth, rate limit,
        # metrics, tracing, errors) and is the server's one generic handler (see handlers.py).
        handlers = Handlers(RpcWrapper(self.keys, settings.service_token, RateLimiter(self._rate_of)).wrap)
        self.health = health_aio.HealthServicer()
        self.scheduler: delivery_scheduler.Scheduler | None = None
        self.sweeper = Sweeper(self.db)
        self._stopped = False
        campaigns_servicer.add_to_server(handlers, self.ops, self.hub)
        chips_servicer.add_to_server(handlers, self.ops)
        webhooks_servicer.add_to_server(handlers, self.ops)
        audit_servicer.add_to_server(handlers, self.ops)
        credits_servicer.add_to_server(handlers, self.ops)
        suppressions_servicer.add_to_server(handlers, self.ops)
        delivery_servicer.add_to_server(handlers, self.db, self.settings)  # type: ignore[arg-type]
        names = [*SERVICE_NAMES, DELIVERY_SERVICE]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, handlers)
        # What reflection.enable_server_reflection does for a grpc.aio server, into `handlers`.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection_aio.ReflectionServicer([*names, health.SERVICE_NAME, reflection.SERVICE_NAME]), handlers)
        handlers.install(self.server)
        self.service_names = names

    def _rate_of(self, user_id: uuid.UUID) -> float:
        with self.db.session() as s:
            return limits.for_user(s, self.settings, user_id).rpc_per_second

    def _lookup_key(self, key_hash: str) -> Any:
        with self.db.session() as s:
            return users_repo.by_key_hash(s, key_hash)

    def _wake(self) -> None:
        self.hub.wake()
        self.relay.wake()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Work that coroutines hand to threads (key lookups, snapshots, an import's transaction)
        # runs on the same elastic pool as the unary RPCs: it grows when long imports hold threads.
        loop.set_default_executor(self.pool)
        await self.db.loop_reads.start()
        port = self.server.add_insecure_port(self.settings.listen)
        if port == 0:
            raise RuntimeError(f"cannot listen on {self.settings.listen}")
        await self.server.start()
        metrics.serve(self.settings.metrics_listen)
        self.scheduler = delivery_scheduler.start(self.db, self.settings)
        self.sweeper.start()
        self.hub.start()
        await self.relay.start()
        dsn = asyncpg_dsn(self.settings.session_url)

        def on_notify() -> None:
            loop.call_soon_threadsafe(self._wake)

        def on_leader(leading: bool) -> None:
            loop.call_soon_threadsafe(self.relay.set_leader, leading)

        self.listener = Listener(dsn, on_notify=on_notify, on_leader=on_leader).start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("campaign_service listening on %s (dispatcher %s, services: %s)", self.settings.listen,
                 self.settings.dispatcher_target, ", ".join(self.service_names))

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        log.info("draining: health NOT_SERVING, grace %.0fs", grace)
        await self.health.enter_graceful_shutdown()
        self.hub.close_all()
        if self.scheduler is not None:
            try:
                await loop.run_in_executor(None, self.scheduler.stop)
            except Exception as exc:
                log.warning("scheduler stop failed: %s", exc)
        await loop.run_in_executor(None, self.sweeper.stop)
        if self.listener is not None:
            await loop.run_in_executor(None, self.listener.stop)
        await self.server.stop(grace)
        await self.relay.stop()
        await self.hub.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.background.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()
        await self.db.loop_reads.close()
        self.db.dispose()
        log.info("campaign_service stopped")


def tune_gc() -> None:
    """Fewer cyclic-GC passes: every RPC allocates many short-lived objects (protobuf, SQLAlchemy
    rows), almost none in cycles, and the default gen-0 threshold (700) ran a collection every few
    GetCampaign calls, each walking everything young under the GIL. Objects alive at startup
    (modules, settings, the pool) are frozen out of the scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def serve() -> None:
    settings = config.load()
    logs.setup(settings.log_level)
    if tracing.setup():
        log.info("tracing on: spans exported over OTLP/HTTP")
    app = App(settings)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("signal %s received", sig.name)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    tune_gc()
    await app.start()
    await done.wait()
    await app.stop()
    tracing.shutdown()


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
