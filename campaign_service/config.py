"""Configuration from the environment, with defaults that work for `make run`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


#: Where WAHA usually runs: this machine's port 3000, or the `waha` service of docker-compose.
DEFAULT_WAHA_HOSTS = "127.0.0.1:3000,localhost:3000,waha:3000"

#: The common schedule (Svix, Standard Webhooks): now, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_WEBHOOK_SCHEDULE = "0,5,300,1800,7200,18000,36000,36000"


_MIB = 1024 * 1024


def _flag_env(name: str, default: bool) -> bool:
    """on/off, true/false, 1/0, yes/no; anything else is a configuration error, said at startup."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"{name}={raw!r}: expected on or off")


def _int_env(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


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
    # Server-side prepared statements for the hot paths; "off" behind a pooler in transaction mode.
    db_prepared_statements: bool = field(default_factory=lambda: _flag_env("WHAGO_DB_PREPARED_STATEMENTS", True))
    # A connection that is one PostgreSQL session (direct, or a session-mode pooler) for the event
    # relay's LISTEN and leader lock and for migrations, which a transaction-mode pooler cannot
    # carry; DATABASE_URL when unset.
    db_session_url: str = field(default_factory=lambda: os.environ.get("WHAGO_DB_SESSION_URL", ""))
    dispatcher_timeout: float = field(default_factory=lambda: float(os.environ.get("DISPATCHER_TIMEOUT_SECONDS", "45")))
    log_level: str = field(default_factory=lambda: os.environ.get("WHAGO_LOG_LEVEL", "INFO"))
    # Prometheus /metrics endpoint (host:port; port 0 picks one and logs it), empty = off.
    metrics_listen: str = field(default_factory=lambda: os.environ.get("CAMPAIGN_METRICS_LISTEN", ""))
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
    # Fernet keys sealing chip WAHA API keys at rest (the first seals; see secrets_box.py).
    secret_keys: str = field(default_factory=lambda: os.environ.get("WHAGO_SECRET_KEYS", ""), repr=False)
    # The WAHA servers chips may point at: "host" (any port) or "host:port", comma-separated. A
    # chip's WAHA URL is user input the dispatcher calls with credentials.
    waha_hosts: str = field(default_factory=lambda: os.environ.get("WHAGO_WAHA_HOSTS", DEFAULT_WAHA_HOSTS))
    # Per-user quotas and RPC rate (calls a second per process; 0: unlimited); an operator overrides
    # them per user with `admin set-limits`.
    quota_campaigns: int = field(default_factory=lambda: int(os.environ.get("WHAGO_QUOTA_CAMPAIGNS", "10000")))
    quota_contacts_per_campaign: int = field(default_factory=lambda: int(
        os.environ.get("WHAGO_QUOTA_CONTACTS_PER_CAMPAIGN", "2000000")))
    quota_chips: int = field(default_factory=lambda: int(os.environ.get("WHAGO_QUOTA_CHIPS", "500")))
    rpc_per_second: float = field(default_factory=lambda: float(os.environ.get("WHAGO_RPC_PER_SECOND", "0")))
    # Relayed events (and their finished deliveries) are kept this long, then removed.
    event_retention_seconds: float = field(default_factory=lambda: float(
        os.environ.get("WHAGO_EVENT_RETENTION_DAYS", "30")) * 86400)
    # How many deliveries are in flight at once (over all endpoints).
    webhook_concurrency: int = field(default_factory=lambda: int(os.environ.get("WHAGO_WEBHOOK_CONCURRENCY", "64")))
    # -- media: per-kind size limits in bytes, WhatsApp's (image 5 MB, video and audio 16 MB,
    # document 100 MB) by default; lower them to refuse sooner, raising them only trades a refusal
    # here for one by WhatsApp.
    media_max_image_bytes: int = field(default_factory=lambda: _int_env("WHAGO_MEDIA_MAX_IMAGE_BYTES", 5 * _MIB))
    media_max_video_bytes: int = field(default_factory=lambda: _int_env("WHAGO_MEDIA_MAX_VIDEO_BYTES", 16 * _MIB))
    media_max_audio_bytes: int = field(default_factory=lambda: _int_env("WHAGO_MEDIA_MAX_AUDIO_BYTES", 16 * _MIB))
    media_max_document_bytes: int = field(default_factory=lambda: _int_env("WHAGO_MEDIA_MAX_DOCUMENT_BYTES",
                                                                           100 * _MIB))
    # Chip warm-up (warmup.py): whether a chip registered without a plan gets the default plan.
    warmup_default: bool = field(default_factory=lambda: os.environ.get(
        "WHAGO_WARMUP_DEFAULT", "on").strip().lower() not in ("off", "0", "false", "no"))
    # StartCampaign of a campaign of at least start_parallel_min contacts writes its messages over
    # start_parallel PostgreSQL connections at once (ops/start_messages.py); 1: one statement.
    start_parallel: int = field(default_factory=lambda: _int_env("WHAGO_START_PARALLEL", 2))
    start_parallel_min: int = field(default_factory=lambda: _int_env("WHAGO_START_PARALLEL_MIN", 200_000))
    # DeleteCampaign removes up to this many contacts + messages in its own transaction; a bigger
    # campaign's rows are purged in the background after its row is gone (sweeps.py).
    delete_inline_rows: int = field(default_factory=lambda: _int_env("WHAGO_DELETE_INLINE_ROWS", 50_000))
    # CancelCampaign fails up to this many PENDING + SENDING + FAILED messages in its own transaction;
    # above it the PENDING ones are failed in the background after it returns (sweeps.py).
    cancel_inline_rows: int = field(default_factory=lambda: _int_env("WHAGO_CANCEL_INLINE_ROWS", 50_000))

    @property
    def session_url(self) -> str:
        """Where a PostgreSQL session is needed (LISTEN, the relay's leader lock, migrations)."""
        return self.db_session_url or self.database_url


def load() -> Settings:
    return Settings()
