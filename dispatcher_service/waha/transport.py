"""A lean HTTP/1.1 keep-alive client for WAHA's JSON API: asyncio transports + httptools' parser.

Why not aiohttp's client: at full speed it was ~70% of the worker's CPU (0.17 of 0.24 ms per message,
`make bench` dispatch, when every message cost two WAHA requests: new-message-id, then sendText).
This client did the same two requests for ~0.055 ms. It does only
what WAHA's API needs: one request at a time per connection, JSON bodies, `Content-Length` or chunked
answers (parsed by httptools, the parser uvicorn uses), TLS through asyncio, one total timeout per
request. No redirects, cookies, proxies or compression (WAHA uses none of them).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

# A connection idle longer than this is closed rather than reused: Node's HTTP server (WAHA) closes
# idle keep-alive connections after 5 s, and a request written as it does so would fail.
IDLE_SECONDS = 4.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class HttpTimeout(Exception):
    """No complete answer within the request's timeout (the request may have reached the server)."""


class HttpConnectionError(Exception):
    """The connection failed or closed before a complete answer (the request may have reached the server)."""


@dataclass(frozen=True)
class Origin:
    """Where requests go, parsed once from a base URL (`http[s]://host[:port][/prefix]`)."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_header: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        u = urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        default = (u.scheme == "http" and port == 80) or (u.scheme == "https" and port == 443)
        host = u.hostname.encode("idna").decode("ascii") if not u.hostname.isascii() else u.hostname
        host = f"[{host}]" if ":" in host else host
        return cls(u.scheme, u.hostname, port, u.path, host if default else f"{host}:{port}")


@dataclass
class Response:
    status: int
    body: bytes


@dataclass(eq=False)
class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser's callbacks fill the answer of the request in flight."""

    origin: Origin
    transport: asyncio.Transport | None = None
    waiter: asyncio.Future[Response] | None = None
    closed: bool = False
    idle_since: float = 0.0
    _chunks: list[bytes] = field(default_factory=list)
    _size: int = 0
    _keep_alive: bool = True
    _headers_done: bool = False
    _framed: bool = False  # the answer says where it ends (Content-Length or chunked)

    def __post_init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HttpConnectionError(f"bad HTTP answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self._headers_done and not self._framed:  # an answer that ends with the connection
                self._complete()
                return
            self.waiter.set_exception(HttpConnectionError(f"connection closed before the answer ({exc or 'EOF'})"))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._chunks, self._size, self._headers_done, self._framed = [], 0, False, False

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n == b"content-length" or (n == b"transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail(HttpConnectionError(f"answer larger than {MAX_RESPONSE_BYTES} bytes"))
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete()

    # -- helpers
    def _complete(self) -> None:
        w, self.waiter = self.waiter, None
        if w is None or w.done():
            self.abort()  # an answer nobody asked for: the connection is out of step
            return
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        if not self._keep_alive:
            self.abort()
        w.set_result(Response(self.parser.get_status_code(), body))

    def _fail(self, exc: Exception) -> None:
        self.abort()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpClient:
    """A pool of keep-alive connections per origin; one process-wide instance, shared by all lanes.

    `limit` bounds the connections open at once (each request holds one for its whole exchange)."""

    def __init__(self, timeout: float, limit: int = 1200, ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._slots = asyncio.Semaphore(limit)
        self._ssl = ssl_context  # https origins: the system's trust store unless given
        self._closed = False

    async def request(self, origin: Origin, method: str, target: str, headers: bytes, body: bytes | None = None,
                      timeout: float | None = None) -> Response:
        """Send `method target` (target: path + query, without the origin's prefix) with `headers`
        (pre-encoded `Name: value\\r\\n` lines) and wait for the whole answer.

        Raises HttpTimeout / HttpConnectionError; a reused connection closed by the server before it
        answered is retried once on a new one for GET (it cannot have done anything)."""
        if self._closed:
            raise HttpConnectionError("HTTP client closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        # No Content-Length on a GET/HEAD without a body (RFC 9110 8.6: nothing to frame); one header
        # less for WAHA to parse on every new-message-id. Other methods say 0 (some servers want it).
        length = (f"Content-Length: {len(body)}\r\n" if body is not None
                  else "" if method in ("GET", "HEAD") else "Content-Length: 0\r\n")
        head = (f"{method} {origin.prefix}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
                f"{length}").encode() + headers + b"\r\n"
        async with self._slots:
            for attempt in (0, 1):
                conn, reused = await self._acquire(origin, deadline)
                try:
                    resp = await self._exchange(loop, conn, head, body, deadline)
                except HttpConnectionError:
                    conn.abort()
                    if reused and attempt == 0 and method == "GET" and not conn._headers_done:
                        continue
                    raise
                except BaseException:
                    conn.abort()  # timed out or cancelled mid-exchange: the connection is out of step
                    raise
                finally:
                    self._busy.discard(conn)
                self._release(origin, conn)
                return resp
        raise AssertionError("unreachable")

    async def _exchange(self, loop: asyncio.AbstractEventLoop, conn: _Connection, head: bytes, body: bytes | None,
                        deadline: float) -> Response:
        waiter: asyncio.Future[Response] = loop.create_future()
        conn.waiter = waiter
        conn._headers_done = False
        assert conn.transport is not None
        if body is None:
            conn.transport.write(head)
        elif len(body) < 16384:
            conn.transport.write(head + body)
        else:
            conn.transport.writelines((head, body))
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    async def _acquire(self, origin: Origin, deadline: float) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: the likeliest still open
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                self._busy.add(conn)
                return conn, True
            conn.abort()
        loop = asyncio.get_running_loop()
        context = self._ssl_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout_at(deadline):
                tr, proto = await loop.create_connection(lambda: _Connection(origin), origin.host, origin.port,
                                                         ssl=context)
        except TimeoutError as e:
            raise HttpTimeout(f"connect to {origin.host}:{origin.port} timed out") from e
        except OSError as e:
            raise HttpConnectionError(f"connect to {origin.host}:{origin.port}: {e}") from e
        proto.transport = tr  # uvloop may call connection_made only after create_connection returned
        self._busy.add(proto)
        return proto, False

    def _release(self, origin: Origin, conn: _Connection) -> None:
        if conn.closed or self._closed:
            conn.abort()
            return
        now = conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(origin, deque())
        idle.append(conn)
        # Reuse takes the most recent; the oldest, closed by the server or past IDLE_SECONDS, go here.
        while idle and (idle[0].closed or now - idle[0].idle_since >= IDLE_SECONDS):
            idle.popleft().abort()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    @property
    def open_connections(self) -> int:
        return len(self._busy) + sum(len(q) for q in self._idle.values())

    async def close(self) -> None:
        """Close every connection; requests still in flight fail with HttpConnectionError."""
        self._closed = True
        for q in self._idle.values():
            for conn in q:
                conn.abort()
        self._idle.clear()
        for conn in list(self._busy):
            conn._fail(HttpConnectionError("HTTP client closed"))
        await asyncio.sleep(0)  # let the transports finish closing


def _expire(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(HttpTimeout("no answer within the timeout"))
