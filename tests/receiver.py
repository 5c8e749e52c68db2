"""A real HTTP webhook receiver on loopback for the tests: records every request, and answers as
told (a fixed status, a share of 500s, Retry-After), or is down (stopped, same port kept)."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float


class Receiver:
    def __init__(self, seed: int = 7) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self.fail_ratio = 0.0
        self.retry_after: str | None = None
        self.script: list[int] = []  # statuses to answer first, in order
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def _answer(self) -> int:
        with self._lock:
            if self.script:
                return self.script.pop(0)
            if self.fail_ratio and self._rng.random() < self.fail_ratio:
                return 500
            return self.status

    def start(self) -> Receiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status = owner._answer()
                with owner._lock:
                    owner.requests.append(Received({k.lower(): v for k, v in self.headers.items()}, body, status,
                                                   time.monotonic()))
                self.send_response(status)
                if owner.retry_after is not None and status in (429, 503):
                    self.send_header("Retry-After", owner.retry_after)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if 200 <= r.answered < 300]
