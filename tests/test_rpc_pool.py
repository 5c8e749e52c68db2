# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""ElasticThreadPool: a few hot threads for quick work, more only while they are all stuck; and,
on the real campaign_service, long RPCs holding every core thread do not starve GetCampaign."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from campaign_service.rpc_pool import ElasticThreadPool
from tests.helpers import Api, phones
from tests.test_campaign_support import api, draft  # noqa: F401
from whago.campaign.v1 import campaign_service_pb2 as cs


def test_results_and_exceptions_reach_the_futures() -> None:
    pool = ElasticThreadPool(2, 4)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=5) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(timeout=5)
        assert list(pool.map(lambda x: x * x, range(50), timeout=10)) == [x * x for x in range(50)]
    finally:
        pool.shutdown()


def test_quick_work_stays_on_the_core_threads() -> None:
    """Thousands of short tasks from 16 submitters never start more than the core threads."""
    pool = ElasticThreadPool(3, 32, stall_seconds=0.5)
    names: set[str] = set()

    def task() -> None:
        names.add(threading.current_thread().name)

    def submitter() -> None:
        for _ in range(300):
            pool.submit(task).result(timeout=10)

    try:
        ts = [threading.Thread(target=submitter) for _ in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in ts)
        assert 1 <= len(names) <= 3
        assert pool.thread_count <= 3
    finally:
        pool.shutdown()


def test_idle_work_goes_to_the_most_recently_parked_thread() -> None:
    """Sequential tasks all run on one thread (LIFO hand-off), not round-robin over the core."""
    pool = ElasticThreadPool(4, 4)
    try:
        gate = threading.Barrier(5)  # four tasks that must run at once: all four core threads start
        started = [pool.submit(gate.wait, 5) for _ in range(4)]
        gate.wait(5)
        for f in started:
            f.result(timeout=5)
        assert pool.thread_count == 4
        names = {pool.submit(lambda: threading.current_thread().name).result(timeout=5) for _ in range(200)}
        assert len(names) == 1
    finally:
        pool.shutdown()


def test_stuck_core_threads_get_help_up_to_max_workers() -> None:
    """When every thread is blocked, queued work still runs: one thread is added per stall period,
    never more than max_workers."""
    pool = ElasticThreadPool(2, 5, stall_seconds=0.02)
    release = threading.Event()
    try:
        blocked = [pool.submit(release.wait, 10) for _ in range(4)]
        assert pool.submit(lambda: "ran").result(timeout=5) == "ran"  # a helper thread was added
        more = [pool.submit(release.wait, 10) for _ in range(10)]
        time.sleep(0.5)
        assert pool.thread_count == 5  # capped
        release.set()
        assert all(f.result(timeout=10) for f in blocked + more)
    finally:
        release.set()
        pool.shutdown()


def test_threads_above_the_core_retire_when_idle() -> None:
    pool = ElasticThreadPool(1, 6, stall_seconds=0.01, idle_seconds=0.2)
    release = threading.Event()
    try:
        fs = [pool.submit(release.wait, 10) for _ in range(6)]
        deadline = time.monotonic() + 5
        while pool.thread_count < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.thread_count == 6
        release.set()
        for f in fs:
            f.result(timeout=5)
        deadline = time.monotonic() + 5
        while pool.thread_count > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.thread_count == 1
        assert pool.submit(lambda: 7).result(timeout=5) == 7
    finally:
        pool.shutdown()


def test_shutdown_runs_queued_work_or_cancels_it() -> None:
    pool = ElasticThreadPool(1, 1, stall_seconds=10)
    release = threading.Event()
    first = pool.submit(release.wait, 10)
    queued = [pool.submit(lambda i=i: i) for i in range(5)]
    release.set()
    pool.shutdown(wait=True)
    assert first.result(timeout=1) is True
    assert [f.result(timeout=1) for f in queued] == list(range(5))
    assert pool.thread_count == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)

    pool = ElasticThreadPool(1, 1, stall_seconds=10)
    release, started = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return release.wait(10)

    first = pool.submit(hold)
    assert started.wait(10)  # running, not still queued (shutdown would cancel it too)
    queued = [pool.submit(lambda: None) for _ in range(3)]
    threading.Timer(0.2, release.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    assert first.result(timeout=1) is True


def test_long_streams_holding_every_core_thread_do_not_starve_get(api: Api) -> None:
    """Six ImportContacts streams stay open (each holds a pool thread with its import transaction,
    more than the 4 core threads); GetCampaign still answers, and the streams then finish normally."""
    c = draft(api)
    release = threading.Event()
    sent = threading.Semaphore(0)

    def slow_stream(phone: str) -> Iterator[cs.ImportContactsRequest]:
        yield cs.ImportContactsRequest(campaign_id=c.id, contacts=[cs.ContactInput(phone=phone)])
        sent.release()
        release.wait(30)

    streams: list[futures.Future[cs.ImportContactsResponse]] = []
    try:
        for phone in phones(6):
            streams.append(api.campaigns.ImportContacts.future(slow_stream(phone), metadata=api.md, timeout=60))
        for _ in range(6):
            assert sent.acquire(timeout=10)
        time.sleep(0.3)  # the handlers are now blocked reading their streams
        got = api.campaigns.GetCampaign(cs.GetCampaignRequest(campaign_id=c.id), metadata=api.md, timeout=5)
        assert got.id == c.id  # served while six streams hold threads (else DEADLINE_EXCEEDED)
    finally:
        release.set()
    assert sum(f.result(timeout=30).imported_count for f in streams) == 6
    assert api.get(c.id).total_contacts == 6


def test_grpc_accepts_the_pool_as_its_thread_pool() -> None:
    """grpc.server takes it as a ThreadPoolExecutor (also as a per-method experimental_thread_pool)."""
    pool = ElasticThreadPool(1, 2)
    assert isinstance(pool, futures.ThreadPoolExecutor)
    server = grpc.server(pool)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(ch).result(timeout=10)
        ch.close()
    finally:
        server.stop(0).wait()
        pool.shutdown()
