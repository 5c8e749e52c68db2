"""The one shape of campaign_service's periodic background work (scheduler, purge): a daemon thread
calling `tick()` every `period` seconds until `stop()`, backing off while ticks fail (the database
is down: every one would fail), so both stop, pace and back off the same way."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("campaign_service.background")

#: While ticks fail the pause doubles, up to 2**MAX_DOUBLINGS times the period, and `max_pause`.
MAX_DOUBLINGS = 4


class BackgroundLoop:
    """Subclasses give `name` and `tick()`; `tick()` returns whether it went well (an exception
    counts as a failure and is logged)."""

    name = "background"

    def __init__(self, period: float, max_pause: float = 10.0) -> None:
        self.period = period
        self.max_pause = max_pause
        self.failures = 0  # ticks failed in a row
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def tick(self) -> bool:
        raise NotImplementedError

    def start(self) -> BackgroundLoop:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the current tick; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                ok = self.tick()
            except Exception as exc:
                ok = False
                log.warning("%s failed (%d in a row): %s", self.name, self.failures + 1, exc)
            self.failures = 0 if ok else self.failures + 1
            pause = min(self.period * 2 ** min(self.failures, MAX_DOUBLINGS), self.max_pause)
            self._stop.wait(max(0.0, pause - (time.monotonic() - began)))
