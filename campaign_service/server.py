"""`python -m campaign_service.server`: CampaignService, ChipService, CreditService and the internal DeliveryService
on a threaded grpc.server, with reflection and grpc.health.v1, and the delivery scheduler thread.

SIGTERM/SIGINT: health goes NOT_SERVING, in-flight RPCs get `grace` seconds, the engine is disposed."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from campaign_service import config, logs
from campaign_service.db.engine import Database
from campaign_service.delivery import scheduler as delivery_scheduler
from campaign_service.delivery import servicer as delivery_servicer
from campaign_service.dispatch import DispatcherClient
from campaign_service.events import Events
from campaign_service.interceptors import KeyCache, ServerInterceptor
from campaign_service.ops import Operations
from campaign_service.repository import users as users_repo
from campaign_service.rpc_pool import ElasticThreadPool
from campaign_service.servicers import campaigns as campaigns_servicer
from campaign_service.servicers import chips as chips_servicer
from campaign_service.servicers import credits as credits_servicer
from whago.campaign.v1 import campaign_service_pb2, chip_service_pb2, credit_service_pb2, delivery_service_pb2

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
    credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
)
DELIVERY_SERVICE = delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name


class App:
    """The wired-up server: build with `App.create()`, then `start()`, `wait()`, `stop()`."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url, settings.db_pool_size)
        self.events = Events(settings.redis_url)
        self.dispatcher = DispatcherClient(settings.dispatcher_target, settings.service_token,
                                           settings.dispatcher_timeout)
        self.ops = Operations.create(self.db, settings, self.dispatcher, self.events)
        self.keys = KeyCache(self._lookup_key)
        self.pool = ElasticThreadPool(settings.core_workers, settings.max_workers, thread_name_prefix="rpc")
        self.server = grpc.server(self.pool,
                                  interceptors=[ServerInterceptor(self.keys, settings.service_token)],
                                  options=SERVER_OPTIONS, maximum_concurrent_rpcs=settings.max_workers * 8)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.scheduler: delivery_scheduler.Scheduler | None = None
        self._stopped = threading.Event()
        campaigns_servicer.add_to_server(self.server, self.ops)
        chips_servicer.add_to_server(self.server, self.ops)
        credits_servicer.add_to_server(self.server, self.ops)
        delivery_servicer.add_to_server(self.server, self.db, self.settings, self.events)
        names = [*SERVICE_NAMES, DELIVERY_SERVICE]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.service_names = names

    def _lookup_key(self, key_hash: str) -> Any:
        with self.db.session() as s:
            return users_repo.by_key_hash(s, key_hash)

    def start(self) -> None:
        port = self.server.add_insecure_port(self.settings.listen)
        if port == 0:
            raise RuntimeError(f"cannot listen on {self.settings.listen}")
        self.server.start()
        self.scheduler = delivery_scheduler.start(self.db, self.settings, self.events)
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("campaign_service listening on %s (dispatcher %s, services: %s)", self.settings.listen,
                 self.settings.dispatcher_target, ", ".join(self.service_names))

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("draining: health NOT_SERVING, grace %.0fs", grace)
        self.health.enter_graceful_shutdown()
        if self.scheduler is not None:
            try:
                self.scheduler.stop()
            except Exception as exc:
                log.warning("scheduler stop failed: %s", exc)
        self.server.stop(grace=grace).wait()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()
        self.events.close()
        self.db.dispose()
        log.info("campaign_service stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def tune_gc() -> None:
    """Fewer cyclic-GC passes: every RPC allocates many short-lived objects (protobuf, SQLAlchemy
    rows), almost none in cycles, and the default gen-0 threshold (700) ran a collection every few
    GetCampaign calls, each walking everything young under the GIL. Objects alive at startup
    (modules, settings, the pool) are frozen out of the scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def main() -> None:
    settings = config.load()
    logs.setup(settings.log_level)
    app = App(settings)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tune_gc()
    app.start()
    done.wait()
    app.stop()


if __name__ == "__main__":
    main()
