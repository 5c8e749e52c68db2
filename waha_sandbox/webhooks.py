"""The sandbox's WhatsApp receipts: `message.ack` webhooks, posted the way WAHA posts them.

Real WhatsApp acknowledges a sent message twice more: DEVICE (delivered to the phone) and READ.
WAHA turns each into a `message.ack` event (WAHAWebhookMessageAck in its spec) posted to every
webhook whose `events` list it (a session's config, or WAHA's global WHATSAPP_HOOK_* settings). The
sandbox does the same for every message it creates: DEVICE after `delivered_after_ms`, then READ
after `read_after_ms` for a `read_rate` share of them, signed like WAHA when a webhook has an HMAC
key (`X-Webhook-Hmac`: hex SHA-512 of the body). Deliveries are retried a few times and logged for
tests (`/_sandbox/webhooks`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

log = logging.getLogger("waha.sandbox.webhooks")

Json = dict[str, Any]
ACK_NAMES = {2: "DEVICE", 3: "READ"}
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
ATTEMPTS = 3
RETRY_SECONDS = 0.5


def event_id() -> str:
    """WAHA's event ids: "evt_" + a lower-case ULID (48-bit milliseconds, 80 random bits)."""
    n = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    return "evt_" + "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(26)))


def signature(key: str, body: bytes) -> str:
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


@dataclass
class AckPlan:
    """When receipts follow a send."""

    delivered_after_ms: float = 300.0
    read_after_ms: float = 1500.0
    read_rate: float = 0.5


@dataclass
class AckWebhooks:
    hooks: list[Json] = field(default_factory=list)  # WAHA WebhookConfig: url, events, hmac {key}
    plan: AckPlan = field(default_factory=AckPlan)
    log: list[Json] = field(default_factory=list)
    generation: int = 0  # a reset drops receipts still scheduled
    _http: aiohttp.ClientSession | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # -- configuration -------------------------------------------------------------------------
    def set_hooks(self, hooks: Any) -> None:
        if not isinstance(hooks, list):
            raise ValueError("webhooks must be a list of {url, events, hmac}")
        for h in hooks:
            if not isinstance(h, dict) or not isinstance(h.get("url"), str) or not h["url"].startswith(
                    ("http://", "https://")) or not isinstance(h.get("events"), list):
                raise ValueError(f"bad webhook {h!r}: needs an http(s) url and a list of events")
            key = (h.get("hmac") or {}).get("key") if isinstance(h.get("hmac"), dict) else None
            if h.get("hmac") is not None and not isinstance(key, str):
                raise ValueError("webhook hmac must be {\"key\": \"...\"}")
        self.hooks = [dict(h) for h in hooks]

    def set_plan(self, opts: Any) -> None:
        if not isinstance(opts, dict):
            raise ValueError("acks must be an object")
        for k, v in opts.items():
            if k not in ("delivered_after_ms", "read_after_ms", "read_rate"):
                raise ValueError(f"unknown acks option {k!r}")
            value = float(v)
            if value < 0 or (k == "read_rate" and value > 1):
                raise ValueError(f"acks {k} out of range: {v!r}")
            setattr(self.plan, k, value)

    def reset(self, hooks: list[Json]) -> None:
        self.generation += 1
        self.hooks = [dict(h) for h in hooks]
        self.plan = AckPlan()
        self.log = []

    def config_json(self) -> Json:
        return {"webhooks": self.hooks, "acks": vars(self.plan).copy()}

    # -- receipts -------------------------------------------------------------------------------
    def on_sent(self, message: Json, me_info: Callable[[], Json], engine: str, rng: random.Random) -> None:
        """Schedule the receipts of a message just created (called on the event loop for every send:
        nothing else is done, not even the sender's identity, while no webhook wants receipts)."""
        targets = [h for h in self.hooks if "message.ack" in h["events"] or "*" in h["events"]]
        if not targets:
            return
        me = me_info()
        loop = asyncio.get_running_loop()
        gen = self.generation
        acks = [(2, self.plan.delivered_after_ms)]
        if rng.random() < self.plan.read_rate:
            acks.append((3, max(self.plan.read_after_ms, self.plan.delivered_after_ms)))
        for ack, after_ms in acks:
            loop.call_later(after_ms / 1000, self._fire, targets, message, me, engine, ack, gen)

    def _fire(self, targets: list[Json], message: Json, me: Json, engine: str, ack: int, gen: int) -> None:
        if gen != self.generation:
            return
        body = orjson.dumps({
            "id": event_id(), "timestamp": int(time.time() * 1000), "session": message["session"], "metadata": {},
            "engine": engine, "event": "message.ack",
            "payload": {"id": message["id"], "from": me["id"], "to": message["chatId"], "participant": None,
                        "fromMe": True, "ack": ack, "ackName": ACK_NAMES[ack], "_data": {}},
            "me": me,
        })
        for hook in targets:
            task = asyncio.ensure_future(self._post(hook, body, message["id"], ack))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def inbound(self, session: str, me: Json, engine: str, sender: str, body_text: str, message_id: str) -> Json:
        """Post a WAHA `message` event (WAHAWebhookMessage: someone wrote to the session's number)
        to every webhook listening for `message`; returns the event (its payload's id is the
        message id). Signed and retried like the receipts."""
        chat = sender if "@" in sender else f"{''.join(ch for ch in sender if ch.isdigit())}@c.us"
        event: Json = {
            "id": event_id(), "timestamp": int(time.time() * 1000), "session": session, "metadata": {},
            "engine": engine, "event": "message",
            "payload": {"id": f"false_{chat}_{message_id}", "timestamp": int(time.time()), "from": chat,
                        "fromMe": False, "source": "app", "to": me["id"], "participant": None, "body": body_text,
                        "hasMedia": False, "media": None, "ack": 1, "ackName": "SERVER", "_data": {}},
            "me": me,
            "environment": {"version": "2026.7.1", "engine": engine, "tier": "CORE", "browser": "",
                            "platform": "linux/x64", "worker": {"id": None}},
        }
        body = orjson.dumps(event)
        for hook in [h for h in self.hooks if "message" in h["events"] or "*" in h["events"]]:
            task = asyncio.ensure_future(self._post(hook, body, event["payload"]["id"], None, "message"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return event

    async def _post(self, hook: Json, body: bytes, message_id: str, ack: int | None,
                    event: str = "message.ack") -> None:
        headers = {"Content-Type": "application/json", "X-Webhook-Request-Id": secrets.token_hex(8),
                   "X-Webhook-Timestamp": str(int(time.time() * 1000))}
        key = (hook.get("hmac") or {}).get("key")
        if key:
            headers.update({"X-Webhook-Hmac": signature(key, body), "X-Webhook-Hmac-Algorithm": "sha512"})
        entry: Json = {"url": hook["url"], "event": event, "message_id": message_id, "ack": ack,
                       "status": None, "attempts": 0, "ts": time.time()}
        self.log.append(entry)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for attempt in range(1, ATTEMPTS + 1):
            entry["attempts"] = attempt
            try:
                async with self._http.post(hook["url"], data=body, headers=headers) as resp:
                    entry["status"] = resp.status
                    if resp.status < 300:
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                entry["status"] = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(RETRY_SECONDS * attempt)
        log.warning("webhook %s for %s ack %s failed after %d attempts: %s", hook["url"], message_id, ack,
                    ATTEMPTS, entry["status"])

    async def close(self) -> None:
        self.generation += 1
        for t in list(self._tasks):
            t.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None
