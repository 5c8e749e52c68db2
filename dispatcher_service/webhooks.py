"""WAHA webhook receiver: WhatsApp receipts (`message.ack`) become DELIVERED / READ messages, and
inbound texts (`message`) are forwarded to ReportInboundMessages (opt-outs, see below).

Point WAHA's webhooks at `POST http://<DISPATCHER_WEBHOOK_LISTEN>/waha/webhook` with the
`message.ack` event (its global WHATSAPP_HOOK_URL / WHATSAPP_HOOK_EVENTS, or a session's config).
With WAHA_WEBHOOK_HMAC_KEY set, a request must carry WAHA's signature (`X-Webhook-Hmac`: hex
SHA-512 of the body with that key), else 401. Receipts for our own sends (fromMe) with ack DEVICE
(2) become DELIVERED, READ (3) or PLAYED (4) become READ; every other event is answered 200 and
ignored. Receipts are gathered for a few milliseconds into one ReportAcks call; a request is
answered once its receipt is applied, 503 when the campaign service cannot be reached, so WAHA's
retries bring it again (applying one twice is harmless).

`message` events (subscribe WAHA to `message` too): an inbound text (not fromMe, not a group's) is
forwarded, one ReportInboundMessages call per event, with the receiving session and number
(`me.id`, else the payload's `to`); campaign_service decides whether it is one of the chip owner's
opt-out words. A `message` event without a session, payload, id or sender is refused with 400.
An opt-out it applied may come back with a confirmation reply to send: enqueued here (replies.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from dispatcher_service.delivery import DeliveryClient, DeliveryUnavailable
from dispatcher_service.store import Store
from whago.campaign.v1 import delivery_service_pb2 as dpb

log = logging.getLogger("dispatcher.webhooks")

PATH = "/waha/webhook"
OUTCOMES = {2: dpb.DELIVERY_OUTCOME_DELIVERED, 3: dpb.DELIVERY_OUTCOME_READ, 4: dpb.DELIVERY_OUTCOME_READ}
LINGER_SECONDS = 0.02
MAX_BATCH = 1000  # ReportAcks' limit
MAX_BODY = 1024 * 1024
MAX_WAHA_ID_LENGTH = 200  # what DeliveryService takes
MAX_INBOUND_TEXT = 4096  # longer texts are never opt-out words (ReportInboundMessages ignores them)


def _message_id(payload: dict[str, Any]) -> str:
    v = payload.get("id")
    if isinstance(v, dict):  # some engines nest it as {_serialized: ...}
        v = v.get("_serialized") or v.get("id")
    return v if isinstance(v, str) else ""


def inbound_message(event: dict[str, Any]) -> dpb.InboundMessage | str | None:
    """The InboundMessage of a WAHA `message` event; None for one that is not an inbound text
    (fromMe, no body, a group's), the problem (str) for a malformed one."""
    session, payload = event.get("session"), event.get("payload")
    if not isinstance(session, str) or not session:
        return "session: required string"
    if not isinstance(payload, dict):
        return "payload: required object"
    waha_id, sender, body = _message_id(payload), payload.get("from"), payload.get("body")
    if not waha_id or len(waha_id) > MAX_WAHA_ID_LENGTH:
        return f"payload.id: required string of 1-{MAX_WAHA_ID_LENGTH} characters"
    if not isinstance(sender, str) or not sender:
        return "payload.from: required string"
    if body is not None and not isinstance(body, str):
        return "payload.body: must be a string"
    if payload.get("fromMe") is True or not body or payload.get("participant"):
        return None
    me, to = event.get("me"), payload.get("to")
    chip = ""
    if isinstance(me, dict) and isinstance(me.get("id"), str):
        chip = me["id"]
    elif isinstance(to, str):
        chip = to
    msg = dpb.InboundMessage(session=session, chip_phone=chip, sender=sender, text=body[:MAX_INBOUND_TEXT],
                             waha_message_id=waha_id)
    ts = payload.get("timestamp")
    if isinstance(ts, int | float) and ts > 0:
        msg.time.FromSeconds(int(ts))
    return msg


class AckReceiver:
    """The aiohttp handler and the batching of receipts into ReportAcks calls."""

    def __init__(self, delivery: DeliveryClient, hmac_key: str = "", store: Store | None = None) -> None:
        self.delivery = delivery
        self.store = store  # enqueues the opt-out confirmation replies (replies.py)
        self.hmac_key = hmac_key.encode()
        self._pending: list[tuple[dpb.MessageAck, asyncio.Future[None]]] = []
        self._flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(PATH, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if self.hmac_key:
            given = request.headers.get("X-Webhook-Hmac", "")
            if not hmac.compare_digest(given, hmac.new(self.hmac_key, raw, hashlib.sha512).hexdigest()):
                return web.json_response({"error": "bad or missing X-Webhook-Hmac"}, status=401)
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if isinstance(event, dict) and event.get("event") == "message":  # suppression: inbound opt-outs
            return await self._inbound(event)
        if not isinstance(event, dict) or event.get("event") != "message.ack":
            return web.json_response({"ignored": "not a message.ack event"})
        raw_payload = event.get("payload")
        payload: dict[str, Any] = raw_payload if isinstance(raw_payload, dict) else {}
        ack_level = payload.get("ack")
        outcome = OUTCOMES.get(ack_level) if isinstance(ack_level, int) else None
        waha_id = _message_id(payload)
        if payload.get("fromMe") is not True or outcome is None or not waha_id or len(waha_id) > MAX_WAHA_ID_LENGTH:
            return web.json_response({"ignored": "not a delivery or read receipt of a message we sent"})
        ack = dpb.MessageAck(waha_message_id=waha_id, outcome=outcome)
        ts = event.get("timestamp")
        if isinstance(ts, int | float) and ts > 0:
            ack.time.FromMilliseconds(int(ts))
        try:
            await self._submit(ack)
        except DeliveryUnavailable as e:
            log.warning("receipt for %s not applied (WAHA will retry): %s", waha_id, e)
            return web.json_response({"error": "campaign service unavailable"}, status=503)
        return web.json_response({"ok": True})

    async def _inbound(self, event: dict[str, Any]) -> web.Response:
        """A WAHA `message` event (WAHAWebhookMessage): an inbound text is forwarded to
        ReportInboundMessages, which decides whether it is an opt-out. A malformed event is 400."""
        inbound = inbound_message(event)
        if isinstance(inbound, str):
            return web.json_response({"error": inbound}, status=400)
        if inbound is None:
            return web.json_response({"ignored": "not an inbound text message"})
        try:
            out = await self.delivery.inbound([inbound])
        except DeliveryUnavailable as e:
            log.warning("inbound message %s not applied (WAHA will retry): %s", inbound.waha_message_id, e)
            return web.json_response({"error": "campaign service unavailable"}, status=503)
        if out.replies and self.store is not None:
            try:
                await self.store.enqueue_replies(out.replies)
            except (RedisError, OSError) as e:  # the opt-out is applied; its confirmation is lost, not repeated
                log.warning("confirmation reply of %s not enqueued: %s", inbound.waha_message_id, e)
        return web.json_response({"ok": True, "opted_out": out.opted_out, "replies": len(out.replies)})

    def _submit(self, ack: dpb.MessageAck) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((ack, fut))
        if len(self._pending) >= MAX_BATCH:
            self._start_flush()
        elif self._flush is None:
            self._flush = loop.call_later(LINGER_SECONDS, self._start_flush)
        return fut

    def _start_flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if self._pending:
            self._flush = asyncio.get_running_loop().call_later(0, self._start_flush)
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[dpb.MessageAck, asyncio.Future[None]]]) -> None:
        try:
            out = await self.delivery.acks([a for a, _ in batch])
        except Exception as e:  # every waiting request learns it, and answers 503
            err = e if isinstance(e, DeliveryUnavailable) else DeliveryUnavailable(f"ReportAcks: {e}")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        log.debug("receipts: %d matched, %d unmatched", out.matched, out.unmatched)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)


async def start(listen: str, delivery: DeliveryClient, hmac_key: str, store: Store | None = None) -> web.AppRunner:
    """Serve the receiver on `listen` (host:port) on the running loop; stop with `runner.cleanup()`."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(AckReceiver(delivery, hmac_key, store).app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    log.info("WAHA webhook receiver on http://%s%s (hmac %s)", listen, PATH, "on" if hmac_key else "off")
    return runner
