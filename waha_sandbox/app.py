"""The sandbox's HTTP application: WAHA's endpoints (validated against the spec, fault-injectable)
and the ``/_sandbox/`` control API (see README.md beside this file).

Why it exists: the dispatcher's guarantees (stop fence, at most once, pacing, failure handling) can
only be proven against something that behaves like WAHA, records every request with its arrival
time and can be told to fail."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from waha_sandbox import ids
from waha_sandbox.responses import (
    fault_response,
    http_error,
    json_response,
    restricted_error,
    session_not_found,
    session_status_error,
)
from waha_sandbox.spec import SEND_ENDPOINTS, WAHA_VERSION, load_validator
from waha_sandbox.state import Defaults, Fault, Sandbox, Session, phone_digits
from waha_sandbox.validator import Json

MESSAGE_ID_RE = re.compile(r"^(?:true|false)_(?P<chat>[^_]+)_(?P<id>[^_]+)(?:_.*)?$")

Handler = Callable[[web.Request, "Call"], Awaitable[web.Response]]


@dataclass
class Call:
    """One API request in flight: its parsed body, session and log record."""

    record: Json
    body: Any
    session_name: str | None
    session: Session | None = None


class App:
    """The aiohttp application: WAHA endpoints plus the ``/_sandbox/`` control API."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sb = sandbox
        self.stopping = asyncio.Event()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.stopping.set()
        await self.sb.webhooks.close()

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_shutdown.append(self._on_shutdown)
        r = app.router
        r.add_get("/api/sessions/{session}", self._api(self.get_session, session_from="path",
                                                       needs_working=False))
        r.add_get("/api/server/version", self._api(self.server_version, session_from=None, needs_working=False))
        r.add_get("/api/contacts/check-exists", self._api(self.check_exists, session_from="query"))
        r.add_get("/api/{session}/new-message-id", self._api(self.new_message_id, session_from="path"))
        for path, (schema, kind) in SEND_ENDPOINTS.items():
            r.add_post(path, self._api(self._sender(kind), schema=schema))
        r.add_post("/api/sendSeen", self._api(self.send_seen, schema="SendSeenRequest"))
        r.add_post("/api/startTyping", self._api(self.typing, schema="ChatRequest"))
        r.add_post("/api/stopTyping", self._api(self.typing, schema="ChatRequest"))
        r.add_get("/api/{session}/chats/{chatId}/messages/{messageId}",
                  self._api(self.get_message, session_from="path"))
        r.add_route("*", "/api/{tail:.*}", self._api(self.not_found, session_from=None, needs_working=False))
        r.add_post("/_sandbox/reset", self.ctl_reset)
        r.add_get("/_sandbox/config", self.ctl_get_config)
        r.add_post("/_sandbox/config", self.ctl_config)
        r.add_get("/_sandbox/requests", self.ctl_requests)
        r.add_get("/_sandbox/messages", self.ctl_messages)
        r.add_get("/_sandbox/webhooks", self.ctl_webhooks)
        r.add_post("/_sandbox/inbound", self.ctl_inbound)
        return app

    # -- the request pipeline -------------------------------------------------------------------

    def _api(self, handler: Handler, *, schema: str | None = None, session_from: str | None = "body",
             needs_working: bool = True) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Wrap a WAHA handler with what every WAHA call goes through, in WAHA's order:
        record -> API key -> (latency) -> body validation -> session lookup -> (faults) ->
        session status -> handler."""

        async def wrapped(request: web.Request) -> web.Response:
            record: Json = {
                "ts": time.time(), "ts_done": None, "method": request.method, "path": request.path,
                "query": dict(request.query), "session": None, "chat_id": None, "body": None,
                "status": None, "message_id": None, "duplicate": False,
            }
            self.sb.requests.append(record)
            self.sb.request_ts.append(record["ts"])
            try:
                response = await self._pipeline(request, record, handler, schema, session_from, needs_working)
            finally:
                record["ts_done"] = time.time()
            record["status"] = response.status
            return response

        return wrapped

    async def _pipeline(self, request: web.Request, record: Json, handler: Handler, schema: str | None,
                        session_from: str | None, needs_working: bool) -> web.Response:
        sb = self.sb
        body: Any = None
        bad_json: str | None = None
        if request.method == "POST":
            raw = await request.read()
            try:
                body = orjson.loads(raw) if raw else {}
            except ValueError as exc:
                bad_json = str(exc)
            record["body"] = body
        if isinstance(body, dict):
            record["chat_id"] = body.get("chatId") if isinstance(body.get("chatId"), str) else None
        if session_from == "body":
            name = body.get("session") if isinstance(body, dict) else None
            session_name = name if isinstance(name, str) else None
        elif session_from == "path":
            session_name = request.match_info.get("session")
            record["chat_id"] = request.match_info.get("chatId")
        elif session_from == "query":
            session_name = request.query.get("session", "default")
        else:
            session_name = None
        record["session"] = session_name

        if sb.api_key is not None and request.headers.get("X-Api-Key") != sb.api_key:
            return json_response(401, {"message": "Unauthorized", "statusCode": 401})

        known = sb.sessions.get(session_name) if session_name else None
        latency = known.latency_ms if known is not None and known.latency_ms is not None else sb.latency_ms
        if latency > 0:
            await asyncio.sleep(latency / 1000)

        if bad_json is not None:
            return http_error(400, f"Unexpected token in JSON: {bad_json}")
        if schema is not None:
            errors = sb.validator.validate(schema, body)
            if errors:
                return http_error(400, errors)

        call = Call(record=record, body=body, session_name=session_name)
        if session_name is not None:
            call.session = sb.session(session_name)
            if call.session is None:
                if request.path.startswith("/api/sessions/"):
                    return http_error(404, "Session not found")
                return session_not_found(session_name)
            call.session.last_activity = time.time()

        fault = sb.take_fault(call.session, request.path)
        if fault is not None:
            record["fault"] = fault.as_json()
            if fault.timeout:
                return await self._hang(request, call, handler, fault)
            if fault.reset:
                return await self._reset(request, call, handler, fault)
            return fault_response(request, body, call.session, fault)

        if needs_working and call.session is not None and call.session.status != "WORKING":
            return session_status_error(call.session)
        if request.path in SEND_ENDPOINTS and call.session is not None and call.session.restricted:
            return restricted_error(request, body)
        return await handler(request, call)

    async def _hang(self, request: web.Request, call: Call, handler: Handler, fault: Fault) -> web.Response:
        """Hang longer than any client timeout. With ``deliver`` the message is created first, so
        the sender cannot know from the response whether it went out (the at-most-once case)."""
        response: web.Response | None = None
        if fault.deliver and request.path in SEND_ENDPOINTS:
            sess = call.session
            if sess is not None and sess.status == "WORKING" and not sess.restricted:
                response = await handler(request, call)
        try:  # a shutdown ends the hang early so SIGTERM never waits for it
            await asyncio.wait_for(self.stopping.wait(), self.sb.timeout_seconds)
        except TimeoutError:
            pass
        return response if response is not None else http_error(504, "sandbox: injected timeout")

    async def _reset(self, request: web.Request, call: Call, handler: Handler, fault: Fault) -> web.Response:
        """Drop the connection without an answer (a proxy or WAHA restarting under the request).
        With ``deliver`` the message is created first: like a hang, the sender cannot tell."""
        if fault.deliver and request.path in SEND_ENDPOINTS:
            sess = call.session
            if sess is not None and sess.status == "WORKING" and not sess.restricted:
                await handler(request, call)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        call.record["reset"] = True
        raise asyncio.CancelledError  # aiohttp drops a handler cancelled by a lost connection quietly

    # -- WAHA endpoints -------------------------------------------------------------------------

    async def get_session(self, request: web.Request, call: Call) -> web.Response:
        sess = call.session
        assert sess is not None
        activity = sess.last_activity
        return json_response(200, {
            "name": sess.name,
            "status": sess.status,
            "config": {"metadata": {}, "proxy": None, "debug": False, "webhooks": []},
            "me": sess.me_info() if sess.status == "WORKING" else None,
            "assignedWorker": "",
            "presence": None,
            "timestamps": {"activity": int(activity * 1000) if activity else None},
            "apps": None,
            "engine": {"engine": self.sb.engine},
        })

    async def server_version(self, request: web.Request, call: Call) -> web.Response:
        return json_response(200, {"version": WAHA_VERSION, "engine": self.sb.engine, "tier": "CORE", "browser": "",
                           "platform": f"{sys.platform}/{os.uname().machine}", "worker": {"id": None}})

    async def new_message_id(self, request: web.Request, call: Call) -> web.Response:
        message_id = ids.new_message_id()
        call.record["message_id"] = message_id
        return json_response(200, {"id": message_id})

    async def check_exists(self, request: web.Request, call: Call) -> web.Response:
        phone = request.query.get("phone", "")
        digits = phone_digits(phone)
        if not digits:
            return http_error(400, ["phone should not be empty"])
        if digits in self.sb.nonexistent_numbers:
            return json_response(200, {"numberExists": False})
        return json_response(200, {"numberExists": True, "chatId": f"{self.sb.whatsapp_ids.get(digits, digits)}@c.us"})

    def _sender(self, kind: str) -> Handler:
        async def send(request: web.Request, call: Call) -> web.Response:
            return self._send(request, call, kind)

        return send

    def _send(self, request: web.Request, call: Call, kind: str) -> web.Response:
        """Create the message, or return the first one if this id was already sent (no await
        in here: check-and-insert is atomic on the event loop)."""
        sb, body, sess = self.sb, call.body, call.session
        assert sess is not None and isinstance(body, dict)
        chat_id: str = body["chatId"]
        given = body.get("id") if kind == "text" and sb.engine in ids.ENGINES_KEEPING_IDS else None
        short_id = _short_id(given) if isinstance(given, str) and given else ids.new_message_id()
        key = (sess.name, short_id)
        existing = sb.messages_by_key.get(key)
        if existing is not None:
            call.record["duplicate"] = True
            call.record["message_id"] = existing["id"]
            return json_response(201, existing["wa"])
        ts = time.time()
        full_id = f"true_{chat_id}_{short_id}"
        file = body.get("file") if isinstance(body.get("file"), dict) else None
        text = body.get("text") if kind == "text" else body.get("caption")
        media = None
        if file is not None:
            url = file.get("url") or f"http://{request.host}/api/files/{sess.name}/{full_id}"
            media = {"url": url, "mimetype": file.get("mimetype"), "filename": file.get("filename"),
                     "error": None}
        wa = {
            "id": full_id,
            "timestamp": int(ts),
            "from": sess.me_info()["id"],
            "fromMe": True,
            "source": "api",
            "to": chat_id,
            "participant": None,
            "body": text or "",
            "hasMedia": media is not None,
            "media": media,
            "mediaUrl": media["url"] if media else None,
            "ack": 1,
            "ackName": "SERVER",
            "author": None,
            "location": None,
            "vCards": [],
            "_data": {"key": {"remoteJid": chat_id.replace("@c.us", "@s.whatsapp.net"), "fromMe": True,
                              "id": short_id},
                      "messageTimestamp": int(ts), "status": "SERVER_ACK"},
            "replyTo": {"id": body["reply_to"], "hasMedia": False} if body.get("reply_to") else None,
        }
        message = {
            "id": full_id, "short_id": short_id, "session": sess.name, "chatId": chat_id, "type": kind,
            "text": text, "file": {k: v for k, v in (file or {}).items() if k != "data"} or None,
            "reply_to": body.get("reply_to"), "ts": ts, "wa": wa,
        }
        sb.messages_by_key[key] = message
        sb.messages.append(message)
        sb.webhooks.on_sent(message, sess.me_info, sb.engine, sb.rng)
        call.record["message_id"] = full_id
        return json_response(201, wa)

    async def send_seen(self, request: web.Request, call: Call) -> web.Response:
        return json_response(201, {})

    async def typing(self, request: web.Request, call: Call) -> web.Response:
        return json_response(201, {"result": True})

    async def get_message(self, request: web.Request, call: Call) -> web.Response:
        sess = call.session
        assert sess is not None
        chat_id = request.match_info["chatId"]
        message_id = request.match_info["messageId"]
        call.record["message_id"] = message_id
        found = self.sb.messages_by_key.get((sess.name, _short_id(message_id)))
        if found is None or found["chatId"] != chat_id:
            return http_error(404, "Message not found")
        return json_response(200, found["wa"])

    async def not_found(self, request: web.Request, call: Call) -> web.Response:
        return http_error(404, f"Cannot {request.method} {request.path}")

    # -- control API ----------------------------------------------------------------------------

    async def ctl_reset(self, request: web.Request) -> web.Response:
        self.sb.reset()
        return json_response(200, {"ok": True})

    async def ctl_get_config(self, request: web.Request) -> web.Response:
        return json_response(200, self.sb.config_json())

    async def ctl_config(self, request: web.Request) -> web.Response:
        try:
            cfg = await request.json()
            if not isinstance(cfg, dict):
                raise ValueError("config must be a JSON object")
            self.sb.configure(cfg)
        except (ValueError, TypeError) as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(200, self.sb.config_json())

    async def ctl_requests(self, request: web.Request) -> web.Response:
        q = request.query
        since = _since(q)
        if isinstance(since, web.Response):
            return since
        return json_response(200, self.sb.find_requests(since, q.get("session"), q.get("path")))

    async def ctl_webhooks(self, request: web.Request) -> web.Response:
        """Webhook deliveries so far: url, event, message_id, ack, status, attempts, ts."""
        return json_response(200, self.sb.webhooks.log)

    async def ctl_inbound(self, request: web.Request) -> web.Response:
        """{session, from, text}: someone wrote `text` to the session's number; a WAHA `message`
        webhook goes to every webhook listening for `message` (signed like the receipts)."""
        try:
            body = await request.json()
        except ValueError:
            return json_response(400, {"error": "body must be JSON"})
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body.get(k)
                                                 for k in ("session", "from", "text")):
            return json_response(400, {"error": "needs session, from and text (non-empty strings)"})
        sess = self.sb.session(body["session"])
        if sess is None:
            return json_response(404, {"error": f"unknown session {body['session']!r}"})
        event = self.sb.webhooks.inbound(body["session"], sess.me_info(), self.sb.engine, body["from"], body["text"],
                                         ids.new_message_id())
        return json_response(200, event)

    async def ctl_messages(self, request: web.Request) -> web.Response:
        q = request.query
        since = _since(q)
        if isinstance(since, web.Response):
            return since
        return json_response(200, [
            {k: v for k, v in m.items() if k != "wa"} for m in self.sb.messages
            if (q.get("session") is None or m["session"] == q["session"]) and (since is None or m["ts"] >= since)
        ])


def _since(query: Mapping[str, str]) -> float | web.Response | None:
    """The `since` filter of the inspection calls (epoch seconds), or the 400 for a bad one."""
    try:
        return float(query["since"]) if "since" in query else None
    except ValueError:
        return json_response(400, {"error": "since must be a number"})


def _short_id(message_id: str) -> str:
    """The WhatsApp id inside a serialized WAHA id (``true_<chat>_<id>``), or the id itself."""
    m = MESSAGE_ID_RE.match(message_id)
    return m.group("id") if m else message_id


# ---------------------------------------------------------------------------------------------


def make_app(api_key: str | None, latency_ms: float = 0.0, timeout_seconds: float = 30.0,
             webhooks: list[Json] | None = None) -> web.Application:
    """The sandbox application (also usable in-process with aiohttp's test utilities)."""
    sandbox = Sandbox(api_key, Defaults(latency_ms=latency_ms, timeout_seconds=timeout_seconds,
                                        webhooks=webhooks or []), load_validator())
    app = App(sandbox).build()
    app["sandbox"] = sandbox
    return app
