"""Dispatcher configuration, read once from the environment (12-factor, defaults work for `make run`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


MESSAGE_ID_SOURCES = ("local", "waha")


@dataclass(frozen=True)
class Config:
    """Everything the dispatcher server and workers need; no database settings on purpose."""

    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    listen: str = field(default_factory=lambda: _env("DISPATCHER_LISTEN", "127.0.0.1:50052"))
    campaign_target: str = field(default_factory=lambda: _env("CAMPAIGN_TARGET", "127.0.0.1:50051"))
    service_token: str = field(default_factory=lambda: _env("WHAGO_SERVICE_TOKEN", "dev-service-token"))
    queue_name: str = field(default_factory=lambda: _env("DISPATCH_QUEUE", "whago:dispatch"))
    slice_seconds: float = field(default_factory=lambda: _float("DISPATCH_SLICE_SECONDS", 60.0))
    # arq's job timeout: a slice's time at most. Long enough for a slow lane's slice to span several
    # sends (lane/common.py SLICE_SENDS); a dead worker's lanes are taken over in seconds anyway
    # (takeover.py), arq's own re-run after it is only the last backstop.
    job_timeout: float = field(default_factory=lambda: _float("DISPATCH_JOB_TIMEOUT", 600.0))
    waha_timeout: float = field(default_factory=lambda: _float("WAHA_TIMEOUT_SECONDS", 15.0))
    # The WAHA servers lanes may call with a chip's key ("host" or "host:port", comma-separated); the
    # same setting as campaign_service's, which refuses other URLs at registration.
    waha_hosts: str = field(default_factory=lambda: _env("WHAGO_WAHA_HOSTS", "127.0.0.1:3000,localhost:3000,waha:3000"))
    # Lane lock TTL: the owner's heartbeat renews it every quarter of it; once it lapsed, a worker's
    # supervisor (takeover.py, scanning every DISPATCH_TAKEOVER_SCAN_SECONDS) takes the lane over.
    lane_lock_ttl: float = field(default_factory=lambda: max(1.0, _float("DISPATCH_LANE_LOCK_TTL", 6.0)))
    takeover_scan: float = field(default_factory=lambda: max(0.1, _float("DISPATCH_TAKEOVER_SCAN_SECONDS", 1.0)))
    max_jobs: int = field(default_factory=lambda: _int("DISPATCH_MAX_JOBS", 2000))
    log_level: str = field(default_factory=lambda: _env("WHAGO_LOG_LEVEL", "INFO"))
    # Ask WAHA whether each recipient is on WhatsApp before sending (SKIPPED when not).
    check_exists: bool = field(default_factory=lambda: _env("DISPATCH_CHECK_EXISTS", "0") in ("1", "true", "yes"))
    # Retries of a timed-out / 5xx send before the message is FAILED.
    send_retries: int = field(default_factory=lambda: _int("DISPATCH_SEND_RETRIES", 3))
    grace_seconds: float = field(default_factory=lambda: _float("DISPATCHER_GRACE_SECONDS", 10.0))
    # Where a message's WAHA id comes from (chosen before the send either way, for at-most-once):
    # "local" makes it here in the shape GOWS and NOWEB give (waha/message_ids.py), one WAHA request
    # per message; "waha" asks GET /api/{session}/new-message-id for each, for an engine whose ids
    # look different.
    message_ids: str = field(default_factory=lambda: _env("DISPATCH_MESSAGE_IDS", "local"))
    # The WAHA webhook receiver (receipts -> DELIVERED/READ) in the dispatcher server: host:port,
    # empty = off. With a key, requests must carry WAHA's HMAC signature (webhooks.py).
    webhook_listen: str = field(default_factory=lambda: _env("DISPATCHER_WEBHOOK_LISTEN", ""))
    webhook_hmac_key: str = field(default_factory=lambda: _env("WAHA_WEBHOOK_HMAC_KEY", ""))
    # Prometheus /metrics endpoints (host:port; port 0 picks one and logs it), empty = off: the
    # server's, and each worker's (workers on one host need distinct ports, or 0).
    metrics_listen: str = field(default_factory=lambda: _env("DISPATCHER_METRICS_LISTEN", ""))
    worker_metrics_listen: str = field(default_factory=lambda: _env("WORKER_METRICS_LISTEN", ""))

    def __post_init__(self) -> None:
        if self.message_ids not in MESSAGE_ID_SOURCES:
            raise ValueError(f"DISPATCH_MESSAGE_IDS must be one of {', '.join(MESSAGE_ID_SOURCES)}, "
                             f"not {self.message_ids!r}")

    @property
    def stop_wait_seconds(self) -> float:
        """How long a stop waits for in-flight WAHA requests: one request timeout plus a margin."""
        return self.waha_timeout + 5.0


def load() -> Config:
    return Config()
