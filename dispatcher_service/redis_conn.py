"""Redis clients that ride out a redis-server restart (commands retried with backoff)."""

from __future__ import annotations

from urllib.parse import urlparse

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# ~30 retries capped at 2 s each: a restart of a few seconds is invisible to callers.
RETRIES = 30
RETRY_ERRORS: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError]


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), RETRIES)


def arq_settings(url: str, retries: bool = True) -> RedisSettings:
    """arq RedisSettings for the same URL, with the same retry policy."""
    s = RedisSettings.from_dsn(url)
    u = urlparse(url)
    if u.scheme == "unix":  # pragma: no cover - loopback TCP in practice
        return s
    s.conn_retries = 30 if retries else 2
    s.conn_retry_delay = 1
    s.conn_timeout = 2
    s.retry_on_timeout = True
    s.retry_on_error = list(RETRY_ERRORS)
    s.retry = _retry() if retries else Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)
    return s


def arq_client(url: str, retries: bool = False) -> ArqRedis:
    """An ArqRedis (enqueue_job) that connects lazily, so a server starts even while Redis is down."""
    r = _retry() if retries else Retry(ExponentialBackoff(cap=0.5, base=0.05), 3)
    return ArqRedis.from_url(url, retry=r, retry_on_error=RETRY_ERRORS, socket_connect_timeout=2,
                             socket_timeout=10, health_check_interval=10)
