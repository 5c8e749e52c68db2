"""Configuration from the environment, with defaults that work for `make run`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


#: The common schedule (Svix, Standard Webhooks): now, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_SCHEDULE = "0,5,300,1800,7200,18000,36000,36000"


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=lambda: os.environ.get(
        "DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/whago"))
    redis_url: str = field(default_factory=lambda: os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    listen: str = field(default_factory=lambda: os.environ.get("CAMPAIGN_LISTEN", "127.0.0.1:50051"))
    dispatcher_target: str = field(default_factory=lambda: os.environ.get("DISPATCHER_TARGET", "127.0.0.1:50052"))
    service_token: str = field(default_factory=lambda: os.environ.get("WHAGO_SERVICE_TOKEN", "dev-service-token"))
    media_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("WHAGO_MEDIA_DIR", str(REPO / ".run" / "media"))))
    default_region: str = field(default_factory=lambda: os.environ.get("WHAGO_DEFAULT_REGION", "BR"))
    max_workers: int = field(default_factory=lambda: int(os.environ.get("CAMPAIGN_MAX_WORKERS", "32")))
    # RPC threads kept hot; more (up to max_workers) only while these are all stuck (see rpc_pool).
    core_workers: int = field(default_factory=lambda: int(os.environ.get("CAMPAIGN_CORE_WORKERS", "4")))
    db_pool_size: int = field(default_factory=lambda: int(os.environ.get("CAMPAIGN_DB_POOL", "20")))
    dispatcher_timeout: float = field(default_factory=lambda: float(os.environ.get("DISPATCHER_TIMEOUT_SECONDS", "45")))
    log_level: str = field(default_factory=lambda: os.environ.get("WHAGO_LOG_LEVEL", "INFO"))
    # Webhooks. Networks (CIDRs, comma-separated) that endpoint URLs may resolve to although they
    # are not public (SSRF guard); `make run` and the tests allow loopback.
    webhook_allow_cidrs: str = field(default_factory=lambda: os.environ.get("WHAGO_WEBHOOK_ALLOW_CIDRS", ""))
    # Seconds before each attempt (the first is immediate); after the last, the delivery is dead.
    webhook_schedule: tuple[float, ...] = field(default_factory=lambda: tuple(
        float(x) for x in os.environ.get("WHAGO_WEBHOOK_SCHEDULE", DEFAULT_WEBHOOK_SCHEDULE).split(",") if x.strip()))
    webhook_timeout: float = field(default_factory=lambda: float(os.environ.get("WHAGO_WEBHOOK_TIMEOUT_SECONDS", "5")))
    # An endpoint failing without a single success for this long is disabled.
    webhook_disable_after: float = field(default_factory=lambda: float(
        os.environ.get("WHAGO_WEBHOOK_DISABLE_AFTER_SECONDS", str(5 * 24 * 3600))))
    # Relayed events (and their finished deliveries) are kept this long, then removed.
    event_retention_seconds: float = field(default_factory=lambda: float(
        os.environ.get("WHAGO_EVENT_RETENTION_DAYS", "30")) * 86400)
    # How many deliveries are in flight at once (over all endpoints).
    webhook_concurrency: int = field(default_factory=lambda: int(os.environ.get("WHAGO_WEBHOOK_CONCURRENCY", "64")))
    # Chip warm-up (warmup.py): whether a chip registered without a plan gets the default plan.
    warmup_default: bool = field(default_factory=lambda: os.environ.get(
        "WHAGO_WARMUP_DEFAULT", "on").strip().lower() not in ("off", "0", "false", "no"))


def load() -> Settings:
    return Settings()
