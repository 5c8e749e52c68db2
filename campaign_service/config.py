"""Configuration from the environment, with defaults that work for `make run`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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


def load() -> Settings:
    return Settings()
