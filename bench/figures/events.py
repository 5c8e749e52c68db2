"""Event figures: webhook delivery (throughput and commit -> receiver latency, against a bare
signed-POST loop) and WatchCampaign with 1,000 watchers on one campaign_service process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime

import aiohttp
import grpc
import psycopg2

from bench.core import Ctx, RssSampler, pct, rate_ratio
from bench.stack import read_status_kb
from campaign_service import config, outbox
from campaign_service.relay import signing
from devstack.procs import REPO, service_env
from devstack.servers import free_port, wait_port
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import webhook_service_pb2 as wh
from whago.campaign.v1 import webhook_service_pb2_grpc as wh_grpc

_EMIT = """
    WITH s AS (INSERT INTO event_streams (stream, last_seq) VALUES (%(stream)s, 1)
               ON CONFLICT (stream) DO UPDATE SET last_seq = event_streams.last_seq + 1 RETURNING last_seq)
    INSERT INTO events (user_id, stream, seq, type, data)
    SELECT %(user)s, %(stream)s, s.last_seq, %(type)s, jsonb_build_object('n', %(n)s::int, 'seq', s.last_seq) FROM s
    RETURNING id"""


def _emit(conn: psycopg2.extensions.connection, user: str, stream: str, n: int, type_: str) -> tuple[int, float]:
    """One event in its own transaction, as a state change writes it (with the NOTIFY); returns its
    id and the wall-clock time its commit returned."""
    with conn.cursor() as cur:
        cur.execute(_EMIT, {"user": user, "stream": stream, "type": type_, "n": n})
        row = cur.fetchone()
        assert row is not None
        cur.execute(f"SELECT pg_notify('{outbox.NOTIFY_CHANNEL}', '')")
    conn.commit()
    return int(row[0]), time.time()


def _emit_many(conn: psycopg2.extensions.connection, user: str, streams: list[str]) -> list[int]:
    """One event per entry of `streams`, all in one transaction (committed when this returns)."""
    ids = []
    with conn.cursor() as cur:
        for k, stream in enumerate(streams):
            cur.execute(_EMIT, {"user": user, "stream": stream, "type": outbox.CAMPAIGN_PROGRESS, "n": k})
            row = cur.fetchone()
            assert row is not None
            ids.append(int(row[0]))
        cur.execute(f"SELECT pg_notify('{outbox.NOTIFY_CHANNEL}', '')")
    conn.commit()
    return ids


def _user_id(ctx: Ctx, key: str) -> str:
    with psycopg2.connect(ctx.stack.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM users WHERE api_key_hash = %s", (hashlib.sha256(key.encode()).hexdigest(),))
        row = cur.fetchone()
        assert row is not None
        return str(row[0])


def _arrivals(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/arrivals", timeout=30) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def _bare_posts(url: str, n: int, concurrency: int, secret: str) -> float:
    """The baseline: n signed POSTs (same body shape, same signing) from one aiohttp session with the
    relay's concurrency, no database at all. Returns the seconds taken."""
    body = json.dumps({"type": "campaign.progress", "timestamp": datetime.now(UTC).isoformat(),
                       "data": {"n": 1}}).encode()
    queue = list(range(n))

    async def worker(http: aiohttp.ClientSession) -> None:
        while queue:
            i = queue.pop()
            h = signing.headers(f"base_{i}", datetime.now(UTC), body, [secret])
            async with http.post(url, data=body, headers=h, allow_redirects=False) as resp:
                await resp.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return time.perf_counter() - t0


def fig_webhooks(ctx: Ctx) -> None:
    n_streams, per_stream = ctx.n(200, 10), 10
    n = n_streams * per_stream
    thr = ctx.row("throughput", f"webhooks delivered per second, {n} events over {n_streams} streams", "events/s",
                  "rate ratio >= 0.3")
    lat = ctx.row("latency", "webhook commit -> receiver p99, 50 events/s for 10 s", "ms", "p99 <= 250 ms")
    st = ctx.stack
    api = ctx.api()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.webhook_receiver", "--port", str(port)],
                            env=service_env({}), cwd=REPO)
    try:
        wait_port(port, 30)
        hooks = wh_grpc.WebhookServiceStub(st.channel)
        secret = hooks.CreateWebhookEndpoint(wh.CreateWebhookEndpointRequest(endpoint=wh.WebhookEndpoint(
            url=f"http://127.0.0.1:{port}/hooks", enabled=True)), metadata=api.md, timeout=30).secret
        user = _user_id(ctx, api.key)
        conn = psycopg2.connect(st.dsn)
        try:
            # Throughput: every event committed at once (one transaction), then the relay drains them.
            streams = [f"campaign:{uuid.uuid4()}" for _ in range(n_streams)]
            ids = _emit_many(conn, user, [s for _ in range(per_stream) for s in streams])
            t0 = time.time()
            deadline = time.monotonic() + 120
            got: dict[str, float] = {}
            while time.monotonic() < deadline:
                got = _arrivals(port)
                if all(f"evt_{i}" in got for i in ids):
                    break
                time.sleep(0.2)
            missing = sum(1 for i in ids if f"evt_{i}" not in got)
            ours = (n - missing) / (max(got.values()) - t0) if got else 0.0
            concurrency = config.load().webhook_concurrency
            base_s = asyncio.run(_bare_posts(f"http://127.0.0.1:{port}/hooks", n, concurrency, secret))
            rate_ratio(thr, ours, n / base_s, 0.3)
            thr.details = {"events": n, "missing": missing, "baseline": "bare signed aiohttp POST loop, same "
                           "concurrency, no database", "ours": "from the commit of all events to the last arrival"}
            if missing:
                thr.error = f"{missing} of {n} events not delivered in 120 s"
                thr.met = False
            # Latency: a steady 50 events/s over 10 streams.
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/reset", method="POST"), timeout=10)
            streams = streams[:10]
            sent: dict[int, float] = {}
            t_end = time.monotonic() + 10
            k = 0
            while time.monotonic() < t_end:
                i, at = _emit(conn, user, streams[k % 10], k, outbox.CAMPAIGN_PROGRESS)
                sent[i] = at
                k += 1
                time.sleep(max(0.0, 0.02 - (time.time() - at)))
        finally:
            conn.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = _arrivals(port)
            if all(f"evt_{i}" in got for i in sent):
                break
            time.sleep(0.2)
        lags = [(got[f"evt_{i}"] - t) * 1000 for i, t in sent.items() if f"evt_{i}" in got]
        lat.value = pct(lags, 99)
        lat.details = {"events": len(sent), "p50_ms": pct(lags, 50), "max_ms": max(lags) if lags else None}
        lat.met = len(lags) == len(sent) and lat.value <= 250
        if len(lags) != len(sent):
            lat.error = f"{len(sent) - len(lags)} events not delivered"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def fig_watch(ctx: Ctx) -> None:
    watchers = ctx.n(1000, 50)
    r = ctx.row("", f"WatchCampaign, {watchers} watchers of one campaign: commit -> watcher p99", "ms",
                "p99 <= 250 ms")
    mem = ctx.row("memory", f"campaign_service RSS growth with {watchers} watchers", "MB", "<= 100 MB")
    st = ctx.stack
    api = ctx.api()
    camp = api.campaign([])
    user = _user_id(ctx, api.key)
    pid = st.procs["campaign"].proc.pid  # type: ignore[union-attr]
    rss0 = read_status_kb(pid, "VmRSS")
    stream = outbox.campaign_stream(camp.id)
    events = 40
    sent: dict[int, float] = {}
    arrivals: list[tuple[int, float]] = []
    counts = {"snapshots": 0, "events": 0, "errors": 0}

    async def run() -> tuple[int, int]:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{st.ports['campaign']}")
        stub = cs_grpc.CampaignServiceStub(ch)
        ready = asyncio.Event()
        started = 0

        async def watch() -> None:
            nonlocal started
            try:
                call = stub.WatchCampaign(cs.WatchCampaignRequest(campaign_id=camp.id), metadata=api.md, timeout=120)
                async for m in call:
                    if m.WhichOneof("kind") == "snapshot":
                        counts["snapshots"] += 1
                        started += 1
                        if started == watchers:
                            ready.set()
                        continue
                    arrivals.append((m.event.id, time.time()))  # matched to commit times at the end: an
                    counts["events"] += 1  # event can reach a watcher before its emitter's await returns
                    if m.event.data["n"] == events - 1:
                        call.cancel()
                        return
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                counts["errors"] += 1

        tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
        await asyncio.wait_for(ready.wait(), 120)
        threads = read_status_kb(pid, "Threads")
        rss = read_status_kb(pid, "VmRSS")
        conn = psycopg2.connect(st.dsn)
        loop = asyncio.get_running_loop()
        try:
            for k in range(events):
                i, at = await loop.run_in_executor(None, _emit, conn, user, stream, k, outbox.CAMPAIGN_PROGRESS)
                sent[i] = at
                await asyncio.sleep(0.1)
        finally:
            conn.close()
        await asyncio.wait(tasks, timeout=60)
        await ch.close(None)
        return threads, rss

    with RssSampler(pid) as sampler:
        threads, rss = asyncio.run(run())
    lags = [(at - sent[eid]) * 1000 for eid, at in arrivals if eid in sent]
    r.value = pct(lags, 99)
    expected = watchers * events
    r.details = {"watchers": watchers, "events": events, "deliveries": len(lags), "expected": expected,
                 "p50_ms": pct(lags, 50), "server_threads": threads, "errors": counts["errors"]}
    r.met = len(lags) == expected and r.value <= 250
    if len(lags) != expected:
        r.error = f"{expected - len(lags)} of {expected} event deliveries missing"
    mem.value = round((max(rss, sampler.peak_kb) - rss0) / 1024, 1)
    mem.details = {"rss_before_mb": round(rss0 / 1024, 1), "server_threads_with_watchers": threads}
    mem.met = mem.value <= 100
