"""The relay's two loops, as asyncio tasks on campaign_service's event loop (database work goes to
a small executor): fan-out (outbox -> Redis + webhook deliveries) and delivery (due webhooks ->
signed POSTs). Both act only while this process leads (see listener.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import aiohttp
import redis

from campaign_service import metrics
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.relay import payloads, retry, signing, store
from campaign_service.urlguard import GuardedResolver, RefusedURL, URLGuard, parse_allowlist
from campaign_service.wakeups import woken

log = logging.getLogger("campaign_service.relay")

#: At most this much of a receiver's answer is read (and then dropped): a hostile receiver cannot
#: make us buffer a large body.
MAX_ANSWER_BYTES = 64 * 1024
FANOUT_BATCH = 500
PRUNE_EVERY_SECONDS = 300.0


class Relay:
    def __init__(self, db: Database, settings: Settings, executor: ThreadPoolExecutor) -> None:
        self.db = db
        self.settings = settings
        self.guard = URLGuard(parse_allowlist(settings.webhook_allow_cidrs))
        self._executor = executor
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._fanout_wake = asyncio.Event()
        self._send_wake = asyncio.Event()
        self._leading = False
        self._inflight: set[int] = set()
        self._deliveries: set[asyncio.Task[None]] = set()  # referenced until done
        self._done: list[tuple[store.Due, store.Outcome]] = []  # attempted, not yet recorded
        self._record_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    # -- called from the listener thread, through the loop ------------------------------------------

    def wake(self) -> None:
        self._fanout_wake.set()
        self._send_wake.set()

    def set_leader(self, leading: bool) -> None:
        self._leading = leading
        self.wake()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.guard), limit=self.settings.webhook_concurrency,
                                         limit_per_host=self.settings.webhook_concurrency, ttl_dns_cache=None,
                                         use_dns_cache=False)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout, connect=self.settings.webhook_timeout)
        self._http = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        self._tasks = [asyncio.create_task(self._fanout_loop(), name="relay-fanout"),
                       asyncio.create_task(self._send_loop(), name="relay-send"),
                       asyncio.create_task(self._record_loop(), name="relay-record")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._redis.close()

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- fan-out ----------------------------------------------------------------------------------

    def _publish(self, rows: list[payloads.EventRow]) -> None:
        """Redis pub/sub is fire-and-forget for its subscribers anyway: a Redis outage must not hold
        up webhooks, so a failed publish is logged and the batch goes on."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            for ev in rows:
                for channel, body in payloads.redis_messages(ev):
                    pipe.publish(channel, body)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("%d events not published on Redis: %s", len(rows), exc)

    async def _fanout_loop(self) -> None:
        pruned_at = 0.0
        while True:
            await woken(self._fanout_wake, 1.0)
            if not self._leading:
                continue
            if time.monotonic() - pruned_at > PRUNE_EVERY_SECONDS:
                pruned_at = time.monotonic()
                try:
                    n = await self._db(store.prune, self.db, self.settings.event_retention_seconds)
                    if n:
                        log.info("%d events past retention removed", n)
                except Exception as exc:
                    log.warning("event retention sweep failed: %s", exc)
            try:
                while True:
                    n = await self._db(store.relay_batch, self.db, self._publish, FANOUT_BATCH)
                    if n:
                        self._send_wake.set()
                    if n < FANOUT_BATCH:
                        break
            except Exception as exc:  # database down: the next wake-up (or second) tries again
                log.warning("relay fan-out failed: %s", exc)

    # -- delivery ---------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        wait = 1.0
        while True:
            await woken(self._send_wake, wait)
            wait = 1.0
            if not self._leading:
                continue
            # Up to four times the connection limit in flight: the next batch is being sent (queued
            # on the connector) while the last one is being recorded.
            room = 4 * self.settings.webhook_concurrency - len(self._inflight)
            if room <= 0:
                continue
            try:
                due, soonest = await self._db(store.due, self.db, sorted(self._inflight), room)
            except Exception as exc:
                log.warning("webhook deliveries not read: %s", exc)
                continue
            for d in due:
                self._inflight.add(d.delivery_id)
                task = asyncio.create_task(self._deliver(d))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
            if soonest is not None:
                wait = min(1.0, max(0.01, (soonest - datetime.now(UTC)).total_seconds()))

    async def _deliver(self, d: store.Due) -> None:
        try:
            out = await self._attempt(d)
        except Exception as exc:  # a bug, not the receiver's doing: the delivery is tried again
            log.exception("delivery %d not attempted: %s", d.delivery_id, exc)
            self._inflight.discard(d.delivery_id)
            return
        metrics.webhook_attempt(out.ok, out.retry_in, out.latency_ms / 1000)
        self._done.append((d, out))  # in flight until recorded, so it is not picked again meanwhile
        self._record_wake.set()

    async def _record_loop(self) -> None:
        """Records finished attempts in batches: whatever finished while the last batch was being
        written goes into the next transaction."""
        while True:
            await self._record_wake.wait()
            self._record_wake.clear()
            batch, self._done = self._done, []
            if not batch:
                continue
            try:
                disabled = await self._db(store.record, self.db, batch, self.settings.webhook_disable_after)
                metrics.webhook_endpoints_disabled(len(disabled))
                for e in disabled:
                    log.warning("webhook endpoint %s disabled after failing for %.0fs", e,
                                self.settings.webhook_disable_after)
                if disabled:
                    self._fanout_wake.set()
            except Exception as exc:  # not recorded: those deliveries stay due and are tried again
                log.warning("%d delivery attempts not recorded: %s", len(batch), exc)
            for d, _ in batch:
                self._inflight.discard(d.delivery_id)
            self._send_wake.set()

    async def _attempt(self, d: store.Due) -> store.Outcome:
        assert self._http is not None
        body = payloads.webhook_body(d.event)
        headers = signing.headers(d.event.webhook_id, datetime.now(UTC), body, d.secrets)
        t0 = time.perf_counter()
        status, error, retry_after = 0, "", None
        try:
            self.guard.check_literal(d.url)
            async with self._http.post(d.url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                await resp.content.read(MAX_ANSWER_BYTES)
                retry_after = retry.retry_after_seconds(resp.headers.get("Retry-After"))
                if not 200 <= status < 300:
                    error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        except RefusedURL as exc:
            error = f"refused: {exc}"
        except TimeoutError:
            error = f"timed out after {self.settings.webhook_timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        ms = int((time.perf_counter() - t0) * 1000)
        ok = 200 <= status < 300
        retry_in = None
        if not ok and retry.retryable(status) and not error.startswith("refused"):
            retry_in = retry.next_delay(self.settings.webhook_schedule, d.attempts + 1, retry_after)
        return store.Outcome(status, ms, error, ok, retry_in)
