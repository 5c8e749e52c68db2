"""The WAHA HTTP transport (dispatcher_service/waha/transport.py) against scripted HTTP servers on
loopback: answer framings, keep-alive reuse, servers that close, timeouts and cancellation."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from dispatcher_service.waha import transport
from dispatcher_service.waha.transport import HttpClient, HttpConnectionError, HttpTimeout, Origin

T = TypeVar("T")
Answer = Callable[[bytes, int], bytes | None]  # (request head, index on its connection) -> raw answer or None


class ScriptedServer:
    """Reads one request at a time per connection (head + Content-Length body) and writes what
    `answer` returns; None closes the connection without an answer."""

    def __init__(self, answer: Answer, close_after: bool = False, ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.ssl_context = ssl_context
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        k = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                raw = self.answer(head, k)
                k += 1
                if raw is None:
                    break
                writer.write(raw)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"id":"x"}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()
    return asyncio.run(main())


def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request() -> None:
    srv = ScriptedServer(lambda head, k: ok(b'{"n":%d}' % k))

    async def go() -> list[transport.Response]:
        async with srv as url:
            http = HttpClient(5.0)
            o = Origin.parse(url + "/prefix")
            out = [await http.request(o, "GET", f"/a?i={i}", b"X-Api-Key: k\r\n") for i in range(3)]
            out.append(await http.request(o, "POST", "/b", b"Content-Type: application/json\r\n", b'{"a":1}'))
            await http.close()
            return out

    out = run(go)
    assert [r.status for r in out] == [200] * 4
    assert [r.body for r in out[:3]] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert srv.connections == 1
    first = srv.requests[0].split(b"\r\n")
    assert first[0] == b"GET /prefix/a?i=0 HTTP/1.1"
    assert b"X-Api-Key: k" in first and any(h.startswith(b"Host: 127.0.0.1:") for h in first)
    assert not any(h.lower().startswith(b"content-length") for h in first)  # a GET has no content to frame
    assert srv.requests[3].endswith(b'\r\n\r\n{"a":1}') and b"Content-Length: 7" in srv.requests[3]


def test_chunked_and_close_delimited_answers_are_read_whole() -> None:
    chunked = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"a\":\r\n3\r\n12}\r\n0\r\n\r\n")
    srv = ScriptedServer(lambda head, k: chunked)
    eof = ScriptedServer(lambda head, k: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"b\":2}", close_after=True)

    async def go() -> tuple[transport.Response, transport.Response, transport.Response]:
        async with srv as u1, eof as u2:
            http = HttpClient(5.0)
            a = await http.request(Origin.parse(u1), "POST", "/x", b"", b"{}")
            b = await http.request(Origin.parse(u2), "GET", "/y", b"")
            c = await http.request(Origin.parse(u2), "GET", "/y", b"")  # the closed one is not reused
            await http.close()
            return a, b, c

    a, b, c = run(go)
    assert (a.status, a.body) == (201, b'{"a":12}')
    assert (b.status, b.body) == (200, b'{"b":2}') and c.body == b'{"b":2}'
    assert eof.connections == 2


def test_connection_close_header_is_honoured() -> None:
    srv = ScriptedServer(lambda head, k: ok(extra=b"Connection: close\r\n"))

    async def go() -> int:
        async with srv as url:
            http = HttpClient(5.0)
            for _ in range(3):
                assert (await http.request(Origin.parse(url), "GET", "/", b"")).status == 200
            n = http.open_connections
            await http.close()
            return n

    assert run(go) == 0
    assert srv.connections == 3


def test_a_kept_alive_connection_the_server_closed_is_retried_for_get_not_for_post() -> None:
    # Each connection answers one request, then closes silently when the next one arrives.
    srv = ScriptedServer(lambda head, k: ok() if k == 0 else None)

    async def go() -> tuple[int, str]:
        async with srv as url:
            http = HttpClient(5.0)
            o = Origin.parse(url)
            await http.request(o, "GET", "/", b"")
            again = await http.request(o, "GET", "/", b"")  # reused, closed, retried on a new connection
            with pytest.raises(HttpConnectionError) as e:
                await http.request(o, "POST", "/", b"", b"{}")  # a POST may have been acted upon: no retry
            await http.close()
            return again.status, str(e.value)

    status, err = run(go)
    assert status == 200
    assert "closed before the answer" in err
    assert srv.connections == 2


def test_timeout_raises_and_the_connection_is_not_reused() -> None:
    srv = ScriptedServer(lambda head, k: ok() if b"/fast" in head else b"")  # /slow: never answers

    async def go() -> int:
        async with srv as url:
            http = HttpClient(0.3)
            o = Origin.parse(url)
            with pytest.raises(HttpTimeout):
                await http.request(o, "GET", "/slow", b"")
            assert (await http.request(o, "GET", "/fast", b"")).status == 200
            n = http.open_connections
            await http.close()
            return n

    assert run(go) == 1
    assert srv.connections == 2  # the late answer of /slow can never be read as /fast's


def test_a_cancelled_request_drops_its_connection() -> None:
    srv = ScriptedServer(lambda head, k: ok() if b"/fast" in head else b"")

    async def go() -> None:
        async with srv as url:
            http = HttpClient(5.0)
            o = Origin.parse(url)
            t = asyncio.create_task(http.request(o, "GET", "/slow", b""))
            await asyncio.sleep(0.1)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert http.open_connections == 0
            assert (await http.request(o, "GET", "/fast", b"")).status == 200
            await http.close()

    run(go)
    assert srv.connections == 2


def test_refused_connection_and_bad_answers_are_connection_errors() -> None:
    garbage = ScriptedServer(lambda head, k: b"NOT HTTP AT ALL\r\n\r\n")

    async def go() -> None:
        http = HttpClient(2.0)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(HttpConnectionError):
            await http.request(Origin.parse(f"http://127.0.0.1:{port}"), "GET", "/", b"")
        async with garbage as url:
            with pytest.raises(HttpConnectionError, match="bad HTTP answer"):
                await http.request(Origin.parse(url), "GET", "/", b"")
        await http.close()

    run(go)


def test_origin_parsing() -> None:
    assert Origin.parse("http://waha:3000/") == Origin("http", "waha", 3000, "", "waha:3000")
    assert Origin.parse("https://waha.example.com/base") == Origin("https", "waha.example.com", 443, "/base",
                                                                  "waha.example.com")
    assert Origin.parse("http://bücher.example:3000").host_header == "xn--bcher-kva.example:3000"  # IDNA
    assert Origin.parse("http://[::1]:3000").host_header == "[::1]:3000"
    with pytest.raises(ValueError):
        Origin.parse("ftp://x")


def test_https_origin_round_trip(tmp_path: Path) -> None:
    """WAHA behind TLS: the request goes through asyncio's TLS with the given trust (a self-signed
    certificate for 127.0.0.1 here), and an untrusted certificate is refused."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = ScriptedServer(lambda head, k: ok(b'{"tls":true}'), ssl_context=server_ctx)

    async def go() -> tuple[transport.Response, str]:
        async with srv as url:
            origin = Origin.parse(url.replace("http://", "https://"))
            http = HttpClient(5.0, ssl_context=ssl.create_default_context(cafile=str(cert)))
            r = await http.request(origin, "GET", "/", b"")
            await http.close()
            untrusting = HttpClient(5.0)  # the system's trust store does not know this certificate
            with pytest.raises(HttpConnectionError) as e:
                await untrusting.request(origin, "GET", "/", b"")
            await untrusting.close()
            return r, str(e.value)

    r, err = run(go)
    assert (r.status, r.body) == (200, b'{"tls":true}')
    assert "CERTIFICATE_VERIFY_FAILED" in err


def test_connections_idle_too_long_are_closed_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "IDLE_SECONDS", 0.3)
    srv = ScriptedServer(lambda head, k: ok())

    async def go() -> None:
        async with srv as url:
            http = HttpClient(5.0)
            o = Origin.parse(url)
            await asyncio.gather(*(http.request(o, "GET", "/", b"") for _ in range(3)))
            assert http.open_connections == 3
            await asyncio.sleep(0.2)
            await http.request(o, "GET", "/", b"")  # reuses the newest; the other two keep ageing
            await asyncio.sleep(0.15)
            await http.request(o, "GET", "/", b"")  # the newest again; the two past 0.3 s are closed
            assert http.open_connections == 1
            await asyncio.sleep(0.35)
            await http.request(o, "GET", "/", b"")  # past 0.3 s itself: a new connection
            await http.close()

    run(go)
    assert srv.connections == 4
