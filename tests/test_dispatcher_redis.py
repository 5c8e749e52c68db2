"""Dispatcher state in a real Redis: the chip pacing limiter and the stop fences."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import signal
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from devstack.procs import ServiceProcess
from devstack.servers import Redis as RedisServer
from devstack.servers import free_port
from dispatcher_service import keys
from dispatcher_service.fences import Fences, Stopped
from dispatcher_service.pacing import Limits, Pacer, window_intervals
from whago.campaign.v1 import resources_pb2 as rpb

T = TypeVar("T")


def run(redis_server: RedisServer, fn: Callable[[Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        r = Redis.from_url(redis_server.url)
        try:
            return await fn(r)
        finally:
            await r.aclose()
    return asyncio.run(main())


def uid() -> str:
    return uuid.uuid4().hex[:12]


# -- pacing -------------------------------------------------------------------------------------

def test_limits_default_to_wahas_30_to_60_seconds() -> None:
    assert Limits.from_proto(None) == Limits(30.0, 60.0)
    assert Limits.from_proto(rpb.Pacing()).interval_min == 30.0
    lim = Limits.from_proto(rpb.Pacing(interval_min_seconds=2, interval_max_seconds=5, max_per_hour=7))
    assert (lim.interval_min, lim.interval_max, lim.max_per_hour, lim.max_per_day) == (2, 5, 7, 0)
    assert lim.window is None


def test_two_concurrent_workers_share_a_chip_and_gaps_respect_the_minimum(redis_server: RedisServer) -> None:
    chip = "chip-" + uid()
    lim = Limits(interval_min=0.5, interval_max=1.5)

    async def worker(r: Redis, n: int) -> list[float]:
        p = Pacer(r)
        out = []
        for _ in range(n):
            res = await p.reserve(chip, lim)
            assert res is not None
            out.append(res.slot)
        return out

    async def both(r: Redis) -> list[float]:
        r2 = Redis.from_url(redis_server.url)
        try:
            a, b = await asyncio.gather(worker(r, 15), worker(r2, 15))
        finally:
            await r2.aclose()
        return sorted(a + b)

    slots = run(redis_server, both)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert len(slots) == 30
    assert min(gaps) >= 0.5 - 1e-6
    assert max(gaps) <= 1.5 + 1e-6
    # uniform, not a fixed interval
    assert statistics.pstdev(gaps) > 0.1
    assert len({round(g, 3) for g in gaps}) > 20


def test_hourly_cap_pushes_the_slot_an_hour_after_the_oldest(redis_server: RedisServer) -> None:
    chip = "chip-" + uid()
    lim = Limits(interval_min=0, interval_max=0, max_per_hour=3)

    async def go(r: Redis) -> list[float]:
        p = Pacer(r)
        out = []
        for _ in range(4):
            res = await p.reserve(chip, lim)
            assert res is not None
            out.append(res.slot)
        return out

    slots = run(redis_server, go)
    assert slots[2] - slots[0] < 1
    assert slots[3] >= slots[0] + 3600


def test_daily_cap_and_release_gives_the_slot_back(redis_server: RedisServer) -> None:
    chip = "chip-" + uid()
    lim = Limits(interval_min=10, interval_max=10, max_per_day=2)

    async def go(r: Redis) -> tuple[float, float, float, float]:
        p = Pacer(r)
        a = await p.reserve(chip, lim)
        b = await p.reserve(chip, lim)
        assert a and b
        await p.release(b)  # unused: neither the cap nor the gap should remember it
        c = await p.reserve(chip, lim)
        d = await p.reserve(chip, lim)
        assert c and d
        return a.slot, b.slot, c.slot, d.slot

    a, b, c, d = run(redis_server, go)
    assert b == pytest.approx(a + 10, abs=0.01)
    assert c == pytest.approx(a + 10, abs=0.01)  # rolled back to a, then a fresh gap
    assert d >= a + 86400


def test_sending_window_moves_the_slot_into_allowed_hours(redis_server: RedisServer) -> None:
    tz = "America/Sao_Paulo"
    now_local = dt.datetime.now(ZoneInfo(tz))
    # A window that is closed now: starts two hours from now, one hour long, every day.
    start = (now_local.hour + 2) % 24
    end = start + 1
    w = rpb.SendingWindow(timezone=tz, start_hour=start, end_hour=end)
    lim = Limits(interval_min=0, interval_max=0, window=w)
    chip = "chip-" + uid()

    async def go(r: Redis) -> float:
        res = await Pacer(r).reserve(chip, lim)
        assert res is not None
        return res.slot

    slot = run(redis_server, go)
    local = dt.datetime.fromtimestamp(slot, ZoneInfo(tz))
    assert local.hour == start and local.minute == 0
    assert slot > time.time() + 3600


def test_window_weekdays_and_intervals() -> None:
    w = rpb.SendingWindow(timezone="UTC", start_hour=9, end_hour=17, weekdays=[1])  # Mondays only
    now = dt.datetime(2026, 7, 1, 12, tzinfo=dt.UTC).timestamp()  # a Wednesday
    ivs = window_intervals(w, now)
    assert ivs, "a Monday lies within the horizon"
    for s, e in ivs:
        ds = dt.datetime.fromtimestamp(s, dt.UTC)
        assert ds.isoweekday() == 1 and ds.hour == 9 and e - s == 8 * 3600


def test_no_window_in_horizon_returns_none(redis_server: RedisServer) -> None:
    w = rpb.SendingWindow(timezone="UTC", start_hour=9, end_hour=10, weekdays=[8])  # never matches

    async def go(r: Redis) -> object:
        return await Pacer(r).reserve("chip-" + uid(), Limits(0, 0, window=w))

    assert run(redis_server, go) is None


# -- fences -------------------------------------------------------------------------------------

def test_check_after_stop_fails_and_epoch_rules(redis_server: RedisServer) -> None:
    c = "camp-" + uid()

    async def go(r: Redis) -> None:
        f = Fences(r)
        assert await f.set(c, "run", 3) == "new"
        assert await f.set(c, "run", 3) == "same"
        assert (await f.set(c, "run", 2)).startswith("stale:")
        tok = await f.acquire(c, 3, 5)
        assert isinstance(tok, str)
        await f.release(c, tok)
        res, drained = await f.stop(c, 3, timeout=1)
        assert res == "new" and drained
        with pytest.raises(Stopped):
            await f.acquire(c, 3, 5)
        assert not await f.is_current(c, 3)
        assert (await f.set(c, "run", 3)).startswith("stale:")  # a stopped epoch never restarts
        assert await f.set(c, "stop", 2) == "same"  # an older stop is a no-op
        assert await f.set(c, "run", 4) == "new"
        assert await f.is_current(c, 4)

    run(redis_server, go)


def test_stop_waits_for_an_in_flight_request(redis_server: RedisServer) -> None:
    c = "camp-" + uid()

    async def go(r: Redis) -> tuple[bool, float, float]:
        f = Fences(r)
        await f.set(c, "run", 1)
        tok = await f.acquire(c, 1, 10)
        assert isinstance(tok, str)
        released_at = 0.0

        async def request_ends() -> None:
            nonlocal released_at
            await asyncio.sleep(0.6)
            released_at = time.monotonic()
            await f.release(c, tok)

        t = asyncio.ensure_future(request_ends())
        _, drained = await f.stop(c, 2, timeout=5)
        returned = time.monotonic()
        await t
        return drained, released_at, returned

    drained, released_at, returned = run(redis_server, go)
    assert drained and 0 < released_at <= returned  # stop returned only once the request had ended


def test_expired_tokens_do_not_block_a_stop_forever(redis_server: RedisServer) -> None:
    c = "camp-" + uid()

    async def go(r: Redis) -> tuple[bool, float, float]:
        f = Fences(r)
        await f.set(c, "run", 1)
        tok = await f.acquire(c, 1, 0.4)  # a worker that died mid-request never releases this
        assert isinstance(tok, str)
        expiry = float(await r.zscore(keys.inflight(c), tok) or 0)
        _, drained = await f.stop(c, 2, timeout=30)
        now_s, now_us = await r.time()
        return drained, expiry, now_s + now_us / 1e6

    drained, expiry, returned = run(redis_server, go)
    # Drained (not given up after its 30 s timeout), and not before the dead token expired.
    assert drained and returned >= expiry > 0


def test_stop_bounded_by_timeout_when_tokens_outlive_it(redis_server: RedisServer) -> None:
    c = "camp-" + uid()

    async def go(r: Redis) -> tuple[bool, int]:
        f = Fences(r)
        await f.set(c, "run", 1)
        await f.acquire(c, 1, 30)
        _, drained = await f.stop(c, 2, timeout=0.3)
        return drained, await f.pending(c)

    drained, still_pending = run(redis_server, go)
    assert not drained and still_pending == 1  # gave up at its timeout, long before the token's 30 s


def test_send_acquire_enforces_the_chip_minimum_gap(redis_server: RedisServer) -> None:
    c, chip = "camp-" + uid(), "chip-" + uid()

    async def go(r: Redis) -> None:
        f = Fences(r)
        await f.set(c, "run", 1)
        first = await f.acquire(c, 1, 5, pace_chip=chip, min_gap=2.0)
        assert isinstance(first, str)
        second = await f.acquire(c, 1, 5, pace_chip=chip, min_gap=2.0)
        assert isinstance(second, float) and 1.5 < second <= 2.0
        other = await f.acquire(c, 1, 5, pace_chip="chip-" + uid(), min_gap=2.0)
        assert isinstance(other, str)

    run(redis_server, go)


def test_worker_stops_on_sigterm_within_seconds_even_with_redis_gone(tmp_path: Path) -> None:
    """SIGTERM must stop a worker promptly and cleanly even when Redis is down for good (arq's own
    close() retried the health-key delete for ~50 s, then exited with a traceback)."""
    server = RedisServer(tmp_path / "redis", free_port())
    server.start()
    env = {"REDIS_URL": server.url, "CAMPAIGN_TARGET": "127.0.0.1:1", "WHAGO_SERVICE_TOKEN": "t",
           "WHAGO_LOG_LEVEL": "INFO"}
    worker = ServiceProcess("sigterm-worker", "dispatcher_service.worker", [], env, tmp_path / "logs").start()
    try:
        worker.wait_logged(" started: ", timeout=30)
        server.stop()
        time.sleep(1.0)  # the poll loop meets the dead Redis
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        rc = worker.proc.wait(timeout=10)  # raises TimeoutExpired if the stop hangs on the lost Redis
    finally:
        if worker.alive():
            worker.proc.kill()  # type: ignore[union-attr]
    assert rc == 0, (rc, worker.tail())
    assert "stopped" in worker.tail(20) and "Traceback" not in worker.tail(50)


# -- worker wake-up -----------------------------------------------------------------------------

def test_a_job_enqueued_to_start_now_wakes_an_idle_worker_before_its_next_poll(redis_server: RedisServer) -> None:
    """A real arq worker between polls (30 s apart here) starts a lane enqueued for now within
    moments: Store.enqueue_lanes publishes on the wake channel. A deferred job wakes nobody."""
    from arq import func

    from dispatcher_service import keys
    from dispatcher_service.redis_conn import arq_client, arq_settings
    from dispatcher_service.store import LANE_FUNCTION, Store
    from dispatcher_service.worker import ResilientWorker

    queue = "test:wake:" + uid()
    started: dict[str, float] = {}

    async def lane(ctx: dict[str, object], campaign_id: str, chip: str, epoch: int, n: int) -> None:
        started[chip] = time.monotonic()

    async def main() -> tuple[float, float, bool]:
        worker = ResilientWorker(functions=[func(lane, name=LANE_FUNCTION)], queue_name=queue,
                                 redis_settings=arq_settings(redis_server.url), poll_delay=30.0,
                                 handle_signals=False, keep_result=0)
        assert worker.poll_wait == 30.0
        runner = asyncio.ensure_future(worker.main())
        r = arq_client(redis_server.url)
        try:
            # Wait until the worker listens (its first poll is done by then, the next is 30 s away).
            for _ in range(200):
                if (await r.pubsub_numsub(keys.wake(queue)))[0][1] >= 1:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            store = Store(r, queue)
            await store.enqueue_lanes("c-" + uid(), ["later"], 1, defer=1.0)
            t0 = time.monotonic()
            await store.enqueue_lanes("c-" + uid(), ["now"], 1)
            for _ in range(100):
                if "now" in started:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(max(0.0, t0 + 2.0 - time.monotonic()))  # "later" is due, but no poll was woken for it
            return "now" in started, time.monotonic() - t0, "later" in started
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await worker.close()
            await r.aclose()

    now_started, waited, later_started = asyncio.run(main())
    # The next poll was 30 s away: a job that started within the few seconds watched was woken.
    assert now_started, "the job enqueued for now did not start before the worker's next poll (no wake-up?)"
    # It was due 1 s after its enqueue; the poll that found "now" had run long before that.
    assert not later_started and waited >= 2.0


def test_the_worker_drops_ended_jobs_and_keeps_running_ones(redis_server: RedisServer) -> None:
    """Ended jobs leave the worker's task table at its next poll (their tasks report their end;
    the table is not walked per poll) and a running one stays."""
    from arq import func

    from dispatcher_service.redis_conn import arq_client, arq_settings
    from dispatcher_service.store import LANE_FUNCTION, Store
    from dispatcher_service.worker import ResilientWorker

    queue = "test:reap:" + uid()
    hold = asyncio.Event()

    async def lane(ctx: dict[str, object], campaign_id: str, chip: str, epoch: int, n: int) -> None:
        if chip == "long":
            await hold.wait()

    async def main() -> tuple[set[str], int]:
        worker = ResilientWorker(functions=[func(lane, name=LANE_FUNCTION)], queue_name=queue,
                                 redis_settings=arq_settings(redis_server.url), poll_delay=0.05,
                                 handle_signals=False, keep_result=0)
        runner = asyncio.ensure_future(worker.main())
        r = arq_client(redis_server.url)
        try:
            store = Store(r, queue)
            await store.enqueue_lanes("c-" + uid(), ["a", "b", "c", "long"], 1)
            for _ in range(200):  # all four started and the three short ones reaped
                if worker.jobs_complete >= 3 and len(worker.tasks) == 1:
                    break
                await asyncio.sleep(0.05)
            left = {job_id.rsplit(":", 3)[1] for job_id in worker.tasks}
            counter = worker.job_counter
            hold.set()
            return left, counter
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await worker.close()
            await r.aclose()

    left, counter = asyncio.run(main())
    assert left == {"long"}
    assert counter == 1
