"""arq worker running lane slices: `python -m dispatcher_service.worker`.

Crash semantics we rely on (arq 0.28 source): a running job keeps its id in the queue zset and an
`arq:in-progress:{id}` key with TTL job_timeout+10 s; if the worker dies, another worker re-runs
the same job once that key expires. SIGTERM cancels running jobs; arq puts them back for an
immediate re-run (retry_jobs). Abort (allow_abort_jobs) cancels a job by id via `arq:abort`.
That re-run is only the slow path now: a lane whose owner's heartbeat stops is taken over by
another worker's supervisor within seconds (takeover.py).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import socket
from collections.abc import Awaitable
from typing import Any

from arq import Worker
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from dispatcher_service import config as config_mod
from dispatcher_service import eventloop, keys, logs, metrics, replies, scripts, takeover, tracing
from dispatcher_service.delivery import DeliveryClient
from dispatcher_service.lane.common import STARTING_SLICES, WorkerEnv
from dispatcher_service.lane.loop import run_lane
from dispatcher_service.redis_conn import arq_settings, hiredis_packing
from dispatcher_service.waha.transport import HttpClient

log = logging.getLogger("dispatcher.worker")
CFG = config_mod.load()
SHUTDOWN_REDIS_SECONDS = 3.0
# Polls read the jobs that became due since the previous poll, this much earlier, and everything due
# this often (see ResilientWorker._read_due).
POLL_OVERLAP_MS = 2000
FULL_POLL_SECONDS = 2.0
CLAIM_PER_POLL = 200  # jobs claimed (and started) per poll at most: ~4,000 a second at the 50 ms poll


async def startup(ctx: dict[str, Any]) -> None:
    """One pooled WAHA HTTP client and one gRPC channel per worker process."""
    http = HttpClient(CFG.waha_timeout, limit=max(100, min(CFG.max_jobs + 200, 4000)))
    delivery = DeliveryClient(CFG.campaign_target, CFG.service_token)
    ctx["env"] = WorkerEnv(cfg=CFG, redis=hiredis_packing(ctx["redis"]), http=http, delivery=delivery)
    metrics.serve(CFG.worker_metrics_listen)
    log.info("worker %s@%s started: loop=%s queue=%s campaign_target=%s max_jobs=%d slice=%.0fs job_timeout=%.0fs",
             os.getpid(), socket.gethostname(), eventloop.name(), CFG.queue_name, CFG.campaign_target, CFG.max_jobs,
             CFG.slice_seconds, CFG.job_timeout)


async def shutdown(ctx: dict[str, Any]) -> None:
    env: WorkerEnv | None = ctx.get("env")
    if env is None:
        return
    await env.http.close()
    await env.delivery.close()
    tracing.shutdown()
    log.info("worker %s stopped", os.getpid())


class ResilientWorker(Worker):
    """arq Worker whose poll loop survives a Redis restart instead of exiting, reads only newly due
    jobs and claims them in one step (thousands of lanes on one worker), and polls at once when woken.

    Wake-up: whoever enqueues a job due now publishes on `keys.wake(queue)` (Store.enqueue_lanes);
    the worker listens and cuts its wait between polls short. Without it a new lane waited up to
    `poll_delay` (on average half of it) before its first request. arq's own loop sleeps
    `poll_delay` minus the iteration's time, so it is given 0 and the wait happens in
    `_poll_iteration`, where a wake can end it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poll_wait = self.poll_delay_s
        self.poll_delay_s = 0.0
        self._wake = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._cursor_ms: int | None = None  # `now` of the previous poll (None: read everything due)
        self._last_full_ms = 0
        self._backlog: dict[str, None] = {}  # due job ids read, not claimed yet (insertion-ordered)
        self._claim: AsyncScript | None = None
        self._ended: list[tuple[str, asyncio.Task[Any]]] = []  # jobs whose task ended, not reaped yet

    async def main(self) -> None:
        self._listener = asyncio.ensure_future(self._listen_wake())
        supervisor = asyncio.ensure_future(self._supervise())
        try:
            await super().main()
        finally:
            self._listener.cancel()
            supervisor.cancel()
            # ended before close() shuts the pool
            await asyncio.gather(self._listener, supervisor, return_exceptions=True)

    async def _supervise(self) -> None:
        """Take over lanes whose owner's heartbeat stopped (takeover.py), once on_startup made the env."""
        for _ in range(1_000_000):
            env: WorkerEnv | None = self.ctx.get("env")
            if env is not None:
                await takeover.Supervisor(env.store, CFG.lane_lock_ttl, CFG.takeover_scan, env.beats.holds).run()
                return
            await asyncio.sleep(0.1)

    async def _listen_wake(self) -> None:
        """Subscribe to the wake channel for the worker's life; resubscribe after a Redis outage."""
        channel = keys.wake(self.queue_name)
        for _ in range(10_000_000):
            try:
                if self._pool is None:
                    await asyncio.sleep(0.1)
                    continue
                async with self._pool.pubsub() as ps:
                    await ps.subscribe(channel)
                    async for msg in ps.listen():
                        if msg.get("type") == "message":
                            self._wake.set()
            except Exception as e:  # Redis down or restarting: polls go on every poll_delay meanwhile
                level = logging.DEBUG if isinstance(e, RedisError | OSError) else logging.WARNING
                log.log(level, "wake listener: %s: %s; resubscribing", type(e).__name__, e)
                self._wake.set()  # poll once in case a wake was missed
                await asyncio.sleep(1.0)

    async def _read_due(self) -> list[bytes]:
        """Due job ids, read incrementally: a running job stays in the queue zset until it ends, so
        arq's read of everything due returned every running lane on every poll (10,000 ids 20 times
        a second with 10,000 lanes). A poll reads only what became due since the previous one (less
        POLL_OVERLAP_MS, for enqueuers' clocks and writes in flight); every FULL_POLL_SECONDS the
        whole due range is read as arq does (a job another worker lost, say)."""
        now = timestamp_ms()
        low: float = float("-inf")
        if self._cursor_ms is not None and now - self._last_full_ms < FULL_POLL_SECONDS * 1000:
            low = self._cursor_ms - POLL_OVERLAP_MS
        else:
            self._last_full_ms = now
        got: list[bytes] = await self.pool.zrangebyscore(self.queue_name, min=low, max=now,
                                                         start=self._queue_read_offset, num=self.queue_read_limit)
        self._cursor_ms = now
        return got

    async def _poll_jobs(self) -> None:
        """arq's pick step (arq 0.28 `_poll_iteration`) over `_read_due`; aborts, reaping and the
        health beat are arq's own."""
        if self.allow_pick_jobs:
            await self.start_jobs(await self._read_due())
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        self._reap()
        await self.heart_beat()

    def _reap(self) -> None:
        """Drop the tasks of ended jobs from self.tasks. arq walks every task on every poll to find
        them: with 10,000 lanes sleeping between their sends, 200,000 checks a second and over half
        the worker's idle CPU; here the tasks say so themselves when they end."""
        ended, self._ended = self._ended, []
        for job_id, t in ended:
            if self.tasks.get(job_id) is t:
                del self.tasks[job_id]
            t.result()  # arq's way of surfacing an error of run_job

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs (arq 0.28), with the checks of up to CLAIM_PER_POLL jobs in one atomic
        step (lua/jobs_claim.lua) instead of a WATCH/EXISTS/ZSCORE/MULTI/EXEC exchange per job, one
        after the other (10,000 lanes starting together took that many sequential round trips).
        Due ids wait in a backlog for the next polls beyond that, and while STARTING_SLICES slices
        are in their start: each started job runs arq's own start pipeline on a connection of its
        own (5,000 at once opened 5,000 Redis connections), then its lock, state and first lease.

        A running job stays in the queue zset until it ends; a job in self.tasks runs here (or just
        ended and is collected after this poll): skipped for free."""
        for raw in job_ids:
            job_id = raw.decode()
            if job_id not in self.tasks:
                self._backlog[job_id] = None
        env: WorkerEnv | None = self.ctx.get("env")
        starting = env.starting if env is not None else 0
        room = min(CLAIM_PER_POLL, self.max_jobs - self.job_counter, STARTING_SLICES - starting)
        if room <= 0 or not self._backlog:
            return
        ids = list(itertools.islice(self._backlog, room))
        for job_id in ids:
            del self._backlog[job_id]
        got = await self._claim_script()(keys=[self.queue_name, *(in_progress_key_prefix + j for j in ids)],
                                          args=[int(self.in_progress_timeout_s * 1000), timestamp_ms(), *ids])
        for k in range(0, len(got), 2):  # the others run elsewhere, ended, or are not due: dropped
            job_id = got[k].decode() if isinstance(got[k], bytes) else str(got[k])
            await self.sem.acquire()  # never waits: at most the room left was claimed
            self.job_counter += 1
            t = self.loop.create_task(self.run_job(job_id, int(float(got[k + 1]))))
            t.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            t.add_done_callback(functools.partial(self._job_ended, job_id))
            self.tasks[job_id] = t

    def _job_ended(self, job_id: str, t: asyncio.Task[Any]) -> None:
        self._ended.append((job_id, t))

    def _claim_script(self) -> AsyncScript:
        """jobs_claim on the worker's pool (which arq creates in main())."""
        if self._claim is None:
            self._claim = scripts.register(self.pool, "jobs_claim")
        return self._claim

    async def _poll_iteration(self) -> None:
        self._wake.clear()  # a wake from here on is seen by the wait below
        try:
            if self.burst:
                await super()._poll_iteration()
            else:
                await self._poll_jobs()
        except (RedisError, OSError) as e:
            log.warning("redis unavailable in poll loop (%s: %s); retrying", type(e).__name__, e)
            await asyncio.sleep(1.0)
        if self.burst or self._wake.is_set():
            return
        try:
            await asyncio.wait_for(self._wake.wait(), self.poll_wait)
        except TimeoutError:
            pass

    async def close(self) -> None:
        """arq's close() (arq 0.28), bounded: with Redis gone, its health-key delete retried for ~50 s
        and then exited with a traceback. Lanes get the time to let in-flight requests end and report;
        the Redis steps get a few seconds each (the health key expires by itself); on_shutdown always runs."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=CFG.waha_timeout + 10)
        await _bounded("delete the health-check key", self.pool.delete(self.health_check_key))
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await _bounded("close the Redis pool", self.pool.aclose(close_connection_pool=True))
        self._pool = None


async def _bounded(what: str, step: Awaitable[Any], seconds: float = SHUTDOWN_REDIS_SECONDS) -> None:
    try:
        await asyncio.wait_for(step, seconds)
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("shutdown: could not %s (%s: %s); going on", what, type(e).__name__, e)


class WorkerSettings:
    """arq settings (also usable as `arq dispatcher_service.worker.WorkerSettings`)."""

    functions = [run_lane, replies.send_reply]
    queue_name = CFG.queue_name
    redis_settings: RedisSettings = arq_settings(CFG.redis_url)
    allow_abort_jobs = True
    job_timeout = int(CFG.job_timeout)
    max_jobs = CFG.max_jobs
    max_tries = 50
    keep_result = 60
    poll_delay = 0.05  # a lane due later starts within ~50 ms of being due; one due now at once (wake)
    on_startup = startup
    on_shutdown = shutdown
    health_check_interval = 30
    expires_extra_ms = 86_400_000


def main() -> None:
    logs.setup(CFG.log_level)
    logging.getLogger("arq.worker").setLevel(logging.WARNING if CFG.log_level.upper() != "DEBUG" else logging.DEBUG)
    eventloop.tune_gc()
    tracing.setup("dispatcher_worker")
    eventloop.install()  # arq takes the current loop
    kwargs = {k: v for k, v in vars(WorkerSettings).items() if not k.startswith("_")}
    worker = ResilientWorker(**kwargs)
    worker.run()


if __name__ == "__main__":
    main()
