"""Standard Webhooks signatures (https://www.standardwebhooks.com), made with the reference
library: `webhook-signature` is "v1,<base64 HMAC-SHA256 of id.timestamp.body>", one per live
secret (space-separated) while a rotated secret is in its grace period."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def headers(msg_id: str, when: datetime, body: bytes, live_secrets: Sequence[str]) -> dict[str, str]:
    sigs = " ".join(Webhook(s).sign(msg_id, when, body) for s in live_secrets)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": sigs,
            "content-type": "application/json", "user-agent": "whago-webhooks/1"}
