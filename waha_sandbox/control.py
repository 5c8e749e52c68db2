"""Synchronous client for the WAHA sandbox's control API (``/_sandbox/``).

Why stdlib only: tests (sync pytest functions) and scripts drive the sandbox with this, and they
should need nothing beyond urllib to reset it, inject faults and read what WAHA "received".
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

# The endpoints that create a WhatsApp message (mirrors sandbox.SEND_ENDPOINTS, kept separate so
# importing this module does not import aiohttp).
SEND_PATHS = frozenset({"/api/sendText", "/api/sendImage", "/api/sendFile", "/api/sendVoice", "/api/sendVideo"})


class SandboxError(RuntimeError):
    """The control API refused a call (bad config, unknown key...)."""


class SandboxControl:
    """Reset, configure and inspect a running sandbox at ``base_url`` (e.g. http://127.0.0.1:3000)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}/_sandbox/{path}"
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise SandboxError(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')}") from None

    def reset(self) -> None:
        """Forget every request, message, session and fault; back to startup settings."""
        self._call("POST", "reset", {})

    def configure(self, **cfg: Any) -> dict[str, Any]:
        """Merge settings (``latency_ms``, ``sessions``, ``nonexistent_numbers``, ``whatsapp_ids``, ``timeout_next``,
        ``timeout_seconds``, ``timeout_deliver``, ``auto_create_sessions``, ``engine``, ``webhooks``,
        ``acks``, ``seed``); returns the resulting configuration."""
        result: dict[str, Any] = self._call("POST", "config", cfg)
        return result

    def set_session(self, name: str, **opts: Any) -> dict[str, Any]:
        """Merge one session's options (``status``, ``restricted``, ``latency_ms``, ``fail_next``,
        ``fail_rate``, ``timeout_next``, ``me``); returns that session's configuration."""
        result: dict[str, Any] = self.configure(sessions={name: opts})["sessions"][name]
        return result

    def config(self) -> dict[str, Any]:
        """The current configuration, sessions included."""
        result: dict[str, Any] = self._call("GET", "config")
        return result

    def requests(self, since: float | None = None, session: str | None = None,
                 path: str | None = None) -> list[dict[str, Any]]:
        """Every recorded API request, in arrival order; ``since`` is a ``time.time()`` value
        (requests that arrived at or after it), ``path`` a substring of the request path."""
        result: list[dict[str, Any]] = self._call("GET", "requests", query={
            "since": since, "session": session, "path": path})
        return result

    def sends(self, session: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Requests to the send endpoints that created a message: answered 201, not duplicates."""
        return [r for r in self.requests(since=since, session=session, path="/api/send")
                if r["path"] in SEND_PATHS and r["status"] == 201 and not r["duplicate"]]

    def webhooks(self) -> list[dict[str, Any]]:
        """Webhook deliveries (receipts): url, event, message_id, ack, status, attempts, ts."""
        result: list[dict[str, Any]] = self._call("GET", "webhooks")
        return result

    def inbound(self, session: str, sender: str, text: str) -> dict[str, Any]:
        """Someone (``sender``: phone or chat id) writes ``text`` to the session's number: a WAHA
        ``message`` webhook is posted to the webhooks listening for ``message``. Returns the event."""
        result: dict[str, Any] = self._call("POST", "inbound", {"session": session, "from": sender, "text": text})
        return result

    def messages(self, session: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        """Messages delivered (unique by id): id, short_id, session, chatId, type, text, file, ts."""
        result: list[dict[str, Any]] = self._call("GET", "messages", query={"session": session, "since": since})
        return result
