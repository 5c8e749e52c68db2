"""Status events after a committed change: Redis pub/sub for live listeners, and the user's webhook.

Both are best effort and never fail the RPC that caused them: the database is the truth."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis

log = logging.getLogger("campaign_service.events")

STATUS_CHANNEL = "whago:campaign-status"


def campaign_channel(campaign_id: str) -> str:
    return f"whago:campaign:{campaign_id}:status"


class Events:
    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")

    def campaign_status(self, *, user_id: uuid.UUID, campaign_id: str, state: str, reason: str = "",
                        webhook_url: str | None = None, extra: dict[str, object] | None = None) -> None:
        payload = {"event": "campaign.status", "campaign_id": campaign_id, "user_id": str(user_id),
                   "state": state, "reason": reason, "ts": time.time(), **(extra or {})}
        body = json.dumps(payload)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.publish(STATUS_CHANNEL, body)
            pipe.publish(campaign_channel(campaign_id), body)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("campaign=%s status event not published: %s", campaign_id, exc)
        if webhook_url:
            self._pool.submit(self._post, webhook_url, body, campaign_id)

    @staticmethod
    def _post(url: str, body: str, campaign_id: str) -> None:
        req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"},
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5):
                pass
        except Exception as exc:
            log.warning("campaign=%s webhook %s failed: %s", campaign_id, url, exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._redis.close()
