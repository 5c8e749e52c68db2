"""The baseline loops of `dispatch`: bare sendText loops to the sandbox, no lease, fence or report.

Three clients do the same work (10 concurrent senders, one sandbox session each, the dispatcher's
body shape with a pre-chosen id) so the figure's baseline is the fastest client we know, not a
heavier one that would flatter our ratio: the worker's own HTTP client (waha/transport.py), raw
asyncio streams (one keep-alive connection per sender, nothing but the bytes), and aiohttp (the
baseline before issue 18, kept for reference)."""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.stack import SANDBOX_API_KEY
from dispatcher_service import eventloop
from dispatcher_service.waha.transport import HttpClient, Origin

SENDERS = 10
MAX_SECONDS = 120.0
_HEADERS = {"X-Api-Key": SANDBOX_API_KEY, "Accept": "application/json"}
# The worker's own header block (WahaClient.json_headers), byte for byte.
_RAW_HEADERS = (f"X-Api-Key: {SANDBOX_API_KEY}\r\nAccept: application/json\r\n"
                "Content-Type: application/json\r\n").encode()


@dataclass
class LoopRun:
    """One run of a baseline loop: its rate and the sandbox sessions it used (to count at the sandbox)."""

    client: str
    seconds: float
    sent: int
    sessions: list[str]
    details: dict[str, Any] = field(default_factory=dict)  # what results.json shows of the run

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _body(session: str, k: int, i: int, mid: str) -> dict[str, str]:
    return {"session": session, "chatId": f"55119{k:02d}{i:06d}@c.us", "text": f"Olá Contact {i}", "id": mid}


def _mid() -> str:
    return "3EB0" + secrets.token_hex(9).upper()


# A Post sends one message and returns whether the sandbox answered 200/201; `two` first asks
# new-message-id for the id (the ceiling of DISPATCH_MESSAGE_IDS=waha).
Post = Callable[[int, int], Awaitable[bool]]


class _Transport:
    """The worker's HttpClient (one process-wide pool), as WahaClient drives it."""

    def __init__(self, url: str, two: bool) -> None:
        self.http = HttpClient(timeout=30.0, limit=SENDERS * 2)
        self.origin = Origin.parse(url)
        self.two = two
        self.get_headers = f"X-Api-Key: {SANDBOX_API_KEY}\r\nAccept: application/json\r\n".encode()

    def sender(self, session: str) -> Post:
        async def post(k: int, i: int) -> bool:
            mid = _mid()
            if self.two:
                r = await self.http.request(self.origin, "GET", f"/api/{session}/new-message-id", self.get_headers)
                mid = str(orjson.loads(r.body)["id"])
            resp = await self.http.request(self.origin, "POST", "/api/sendText", _RAW_HEADERS,
                                           orjson.dumps(_body(session, k, i, mid)))
            return resp.status in (200, 201)
        return post

    async def close(self) -> None:
        await self.http.close()


class _Streams:
    """Raw asyncio streams: one keep-alive connection per sender, the request written as bytes,
    the answer read by its Content-Length (the sandbox, aiohttp's server, always sends one)."""

    def __init__(self, url: str, two: bool) -> None:
        self.origin = Origin.parse(url)
        self.two = two
        self.writers: list[asyncio.StreamWriter] = []

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        req: bytes) -> tuple[int, bytes]:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise RuntimeError("sandbox answer without Content-Length")
        return status, await reader.readexactly(length)

    def sender(self, session: str) -> Post:
        o = self.origin
        host = f"Host: {o.host_header}\r\n".encode()
        conn: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def post(k: int, i: int) -> bool:
            if not conn:
                r, w = await asyncio.open_connection(o.host, o.port)
                self.writers.append(w)
                conn.append((r, w))
            reader, writer = conn[0]
            mid = _mid()
            if self.two:
                _, body = await self._exchange(reader, writer, (
                    f"GET {o.prefix}/api/{session}/new-message-id HTTP/1.1\r\n").encode() + host
                    + f"X-Api-Key: {SANDBOX_API_KEY}\r\nAccept: application/json\r\n\r\n".encode())
                mid = str(orjson.loads(body)["id"])
            data = orjson.dumps(_body(session, k, i, mid))
            status, _ = await self._exchange(reader, writer, (
                f"POST {o.prefix}/api/sendText HTTP/1.1\r\n").encode() + host
                + f"Content-Length: {len(data)}\r\n".encode() + _RAW_HEADERS + b"\r\n" + data)
            return status in (200, 201)
        return post

    async def close(self) -> None:
        for w in self.writers:
            w.close()


class _Aiohttp:
    """aiohttp's client (the baseline before issue 18)."""

    def __init__(self, url: str, two: bool) -> None:
        self.url = url
        self.two = two
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=SENDERS * 2),
                                          timeout=aiohttp.ClientTimeout(total=30))

    def sender(self, session: str) -> Post:
        async def post(k: int, i: int) -> bool:
            mid = _mid()
            if self.two:
                async with self.http.get(f"{self.url}/api/{session}/new-message-id", headers=_HEADERS) as resp:
                    mid = str((await resp.json())["id"])
            async with self.http.post(self.url + "/api/sendText", json=_body(session, k, i, mid),
                                      headers=_HEADERS) as resp:
                await resp.read()
                return resp.status in (200, 201)
        return post

    async def close(self) -> None:
        await self.http.close()


CLIENTS: dict[str, type[_Transport] | type[_Streams] | type[_Aiohttp]] = {
    "transport": _Transport, "streams": _Streams, "aiohttp": _Aiohttp,
}
FAST_CLIENTS = ("transport", "streams")  # the baseline is the faster of these (same work, same sandbox)


async def _drive(client: str, url: str, n: int, two: bool) -> LoopRun:
    """SENDERS coroutines, each with its own sandbox session, n messages in all (bounded by MAX_SECONDS)."""
    c = CLIENTS[client](url, two)
    prefix = f"{'floor' if two else 'base'}-{client}-{secrets.token_hex(3)}"
    sessions = [f"{prefix}-{k}" for k in range(SENDERS)]
    sent = 0
    deadline = time.monotonic() + MAX_SECONDS

    async def sender(k: int, count: int) -> None:
        nonlocal sent
        post = c.sender(sessions[k])
        for i in range(count):
            if time.monotonic() > deadline:
                return
            ok = await post(k, i)  # not `sent += await ...`: that reads `sent` before the await
            sent += ok

    try:
        per = [n // SENDERS + (1 if k < n % SENDERS else 0) for k in range(SENDERS)]
        # Connects are inside the timer, as ours pays its own.
        t0 = time.perf_counter()
        await asyncio.gather(*(sender(k, cnt) for k, cnt in enumerate(per)))
        return LoopRun(client, time.perf_counter() - t0, sent, sessions)
    finally:
        await c.close()


def run_loop(client: str, url: str, n: int, two: bool = False) -> LoopRun:
    """One baseline run on the worker's event loop and GC settings (eventloop.tune_gc), so the
    baseline gets every process-level advantage the worker has."""
    thresholds = gc.get_threshold()
    eventloop.tune_gc()
    try:
        return eventloop.run(_drive(client, url, n, two))
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
