"""Client for the WAHA endpoints the dispatcher uses, per /work/shared/waha/openapi.json.

Errors are typed so a lane can classify outcomes (issue 3): 422 session not WORKING, HTTP 500 with
WhatsApp error 463 (restricted number), 400/404 rejected message, other 5xx, and timeouts whose
outcome is uncertain.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from dispatcher_service.waha.transport import HttpClient, HttpConnectionError, HttpTimeout, Origin

log = logging.getLogger("dispatcher.waha")


class WahaError(Exception):
    """A WAHA request failed; `status` is the HTTP status (0 when none) and `body` the answer text."""

    def __init__(self, status: int, body: str, message: str | None = None) -> None:
        super().__init__(message or f"WAHA HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class SessionNotWorking(WahaError):
    """HTTP 422: the session is not WORKING; the chip is unavailable for now."""


class ChipRestricted(WahaError):
    """HTTP 500 carrying WhatsApp error 463: the number is restricted; take the chip out of rotation."""


class MessageRejected(WahaError):
    """HTTP 400/404 for the message itself: retrying will not help."""


class WahaServerError(WahaError):
    """Other 5xx: transient, retry with backoff."""


class WahaTimeout(WahaError):
    """Timeout or connection error: the request may or may not have reached WAHA."""


_ERROR_463 = re.compile(r"\berror\s*463\b|account_restricted", re.IGNORECASE)


def _is_463(body: str) -> bool:
    """WhatsApp's 463 is only in WAHA's exception message/details ("server returned error 463").

    Look there, not anywhere in the body: WAHA echoes the request body in its 500 answers, so a
    phone number or text containing "463" must not read as a restricted chip."""
    try:
        doc = json.loads(body)
    except ValueError:
        return bool(_ERROR_463.search(body))
    exc = doc.get("exception") if isinstance(doc, dict) else None
    if not isinstance(exc, dict):
        return False
    parts = [str(exc.get(k, "")) for k in ("message", "details", "reason")]
    return any(_ERROR_463.search(p) for p in parts)


def classify(status: int, body: str) -> WahaError:
    """Map an HTTP error answer to its typed exception."""
    if status == 422:
        return SessionNotWorking(status, body)
    if status == 500 and _is_463(body):
        return ChipRestricted(status, body)
    if status in (400, 404):
        return MessageRejected(status, body)
    if status >= 500:
        return WahaServerError(status, body)
    return WahaError(status, body)


# MediaKind (whago.campaign.v1) values: the kind campaign_service sniffed from the bytes.
KIND_IMAGE, KIND_VIDEO, KIND_AUDIO, KIND_DOCUMENT = 1, 2, 3, 4
VOICE_MIMETYPE = "audio/ogg; codecs=opus"  # VoiceBinaryFile's default in WAHA's spec


def media_endpoint(mimetype: str, kind: int = 0) -> str:
    """Which send endpoint carries a media file (WAHA has one per kind). The sniffed kind decides;
    without one (media stored before sniffing) the MIME type does. Audio goes as a voice note
    (sendVoice) only when it is OGG (WhatsApp's voice notes are Opus in OGG and we send with
    convert=false); other audio goes with sendFile, which takes any type."""
    m = (mimetype or "").split(";", 1)[0].strip().lower()
    if kind == KIND_IMAGE or (not kind and m.startswith("image/")):
        return "sendImage"
    if kind == KIND_VIDEO or (not kind and m.startswith("video/")):
        return "sendVideo"
    if kind == KIND_AUDIO or (not kind and m.startswith("audio/")):
        return "sendVoice" if m in ("audio/ogg", "audio/opus") else "sendFile"
    return "sendFile"


def host_allowed(origin: Origin, allowlist: str) -> bool:
    """The operator's WAHA servers: "host" (any port) or "host:port" entries, comma-separated."""
    for entry in (e.strip().lower() for e in allowlist.split(",") if e.strip()):
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if (host or entry) == origin.host.lower() and (not port or port == str(origin.port)):
            return True
    return False


class WahaClient:
    """One WAHA server + API key; cheap to create per lane, shares the process-wide HTTP client."""

    def __init__(self, http: HttpClient, base_url: str, api_key: str, timeout: float = 15.0,
                 allowed_hosts: str | None = None) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.origin = Origin.parse(self.base_url)
        # Checked again here, where the key is sent, not only at registration (the setting may change).
        self.refused = allowed_hosts is not None and not host_allowed(self.origin, allowed_hosts)
        if any(ord(c) < 32 or ord(c) == 127 for c in api_key):  # RegisterChip refuses these too
            raise ValueError("WAHA API key contains a control character")
        self.api_key = api_key
        self.timeout = timeout
        self.headers = f"X-Api-Key: {api_key}\r\nAccept: application/json\r\n".encode()
        self.json_headers = self.headers + b"Content-Type: application/json\r\n"

    # -- transport ---------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, json_body: dict[str, Any] | None = None,
                       params: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        if self.refused:
            raise SessionNotWorking(0, "", f"WAHA server {self.origin.host}:{self.origin.port} is not in "
                                           "WHAGO_WAHA_HOSTS: nothing is sent to it")
        data = orjson.dumps(json_body) if json_body is not None else None
        target = f"{path}?{urlencode(params)}" if params else path
        try:
            resp = await self.http.request(self.origin, method, target, self.headers if data is None
                                           else self.json_headers, data, timeout=self.timeout)
        except (HttpTimeout, HttpConnectionError) as e:
            raise WahaTimeout(0, "", f"WAHA {method} {path}: {type(e).__name__}: {e}") from e
        raw = resp.body  # WAHA answers UTF-8 JSON: no charset sniffing of the body
        if resp.status in ok:
            if not raw:
                return {}
            try:
                return orjson.loads(raw)
            except ValueError:
                return {"raw": raw.decode("utf-8", "replace")}
        raise classify(resp.status, raw.decode("utf-8", "replace"))

    # -- sessions ----------------------------------------------------------------------------------
    async def get_session(self, session: str) -> dict[str, Any]:
        """GET /api/sessions/{session} -> SessionInfo (status WORKING when usable)."""
        r: dict[str, Any] = await self._request("GET", f"/api/sessions/{quote(session, safe='')}")
        return r

    async def server_version(self) -> dict[str, Any]:
        """GET /api/server/version -> WAHAEnvironment (version, engine, tier, ...)."""
        r: dict[str, Any] = await self._request("GET", "/api/server/version")
        return r

    # -- messages ----------------------------------------------------------------------------------
    async def new_message_id(self, session: str) -> str:
        """GET /api/{session}/new-message-id: the id is chosen before the send, so it can be looked up later."""
        r = await self._request("GET", f"/api/{quote(session, safe='')}/new-message-id")
        mid = r.get("id") if isinstance(r, dict) else None
        if not mid:
            raise WahaServerError(200, json.dumps(r), "new-message-id answered without an id")
        return str(mid)

    async def send_text(self, session: str, chat_id: str, text: str, message_id: str | None = None) -> dict[str, Any]:
        """POST /api/sendText (201 WAMessage). `message_id` goes in the spec's `id` field (pre-generated id)."""
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "text": text}
        if message_id:
            body["id"] = message_id
        r: dict[str, Any] = await self._request("POST", "/api/sendText", json_body=body, ok=(200, 201))
        return r

    async def send_media(self, session: str, chat_id: str, filename: str, mimetype: str, data_b64: str,
                         caption: str = "", message_id: str | None = None, kind: int = 0) -> dict[str, Any]:
        """POST sendImage/sendVideo/sendVoice/sendFile (media_endpoint) with a BinaryFile. The spec has
        no pre-chosen id field for media, so `message_id` is not sent (media outcomes cannot be looked
        up by id)."""
        del message_id
        endpoint = media_endpoint(mimetype, kind)
        if endpoint == "sendVoice":
            mimetype = VOICE_MIMETYPE
        # BinaryFile / VideoBinaryFile / VoiceBinaryFile all take mimetype, filename and data.
        file: dict[str, Any] = {"mimetype": mimetype, "filename": filename or "file", "data": data_b64}
        body: dict[str, Any] = {"session": session, "chatId": chat_id, "file": file}
        if endpoint in ("sendVideo", "sendVoice"):
            body["convert"] = False  # required by the spec; we send files as uploaded
        if caption and endpoint != "sendVoice":  # voice notes have no caption in the spec
            body["caption"] = caption
        r: dict[str, Any] = await self._request("POST", f"/api/{endpoint}", json_body=body, ok=(200, 201))
        return r

    async def send_seen(self, session: str, chat_id: str) -> None:
        """POST /api/sendSeen: mark the chat read before writing, like a person would."""
        await self._request("POST", "/api/sendSeen", json_body={"session": session, "chatId": chat_id})

    async def start_typing(self, session: str, chat_id: str) -> None:
        await self._request("POST", "/api/startTyping", json_body={"session": session, "chatId": chat_id})

    async def stop_typing(self, session: str, chat_id: str) -> None:
        await self._request("POST", "/api/stopTyping", json_body={"session": session, "chatId": chat_id})

    async def get_message(self, session: str, chat_id: str, message_id: str) -> dict[str, Any] | None:
        """GET /api/{session}/chats/{chatId}/messages/{messageId}; None when WAHA does not know it (404)."""
        path = (f"/api/{quote(session, safe='')}/chats/{quote(chat_id, safe='@')}/messages/"
                f"{quote(message_id, safe='@')}")
        try:
            r = await self._request("GET", path, params={"downloadMedia": "false"})
        except MessageRejected as e:
            if e.status == 404:
                return None
            raise
        if not r:
            return None
        return r if isinstance(r, dict) else {"value": r}

    async def check_exists(self, session: str, phone: str) -> str | None:
        """GET /api/contacts/check-exists: the number's chat id when it is on WhatsApp (WAHA knows
        whether a Brazilian mobile has the ninth digit), None when it is not."""
        r = await self._request("GET", "/api/contacts/check-exists", params={"phone": phone, "session": session})
        if not isinstance(r, dict) or not r.get("numberExists"):
            return None
        chat = r.get("chatId")
        return chat if isinstance(chat, str) and chat else f"{phone}@c.us"
