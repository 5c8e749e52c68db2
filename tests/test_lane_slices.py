"""What a paced lane costs between its sends (issue 18, 10,000 lanes on one worker):
- a slice of a slowly paced lane spans several of its gaps (lane/fenced.py `slice_seconds`);
- a slice whose chip allows no further send of ours before it ends ends without leasing (tested
  in test_guarantees: every message leased once across slices);
- sleeping lanes watch their campaign's fence through one poll per campaign (fence_watch.py):
  a stop still wakes each of them within a poll, a timeout is a plain sleep;
- a worker too busy to beat in time does not take its own lanes over (takeover.py `local`);
- the dispatch's end is found without reading every lane at every lane's end (store.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis

from devstack.servers import Redis
from dispatcher_service import keys
from dispatcher_service.config import Config
from dispatcher_service.fence_watch import FenceWatch
from dispatcher_service.fences import run_value
from dispatcher_service.lane.fenced import slice_seconds
from dispatcher_service.pacing import Limits
from dispatcher_service.store import Store
from dispatcher_service.takeover import Supervisor
from tests.test_campaign_support import engine  # noqa: F401 - fixture
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb


@pytest.mark.parametrize(("gap", "job_timeout", "want"), [
    (1.0, 600.0, 60.0),     # fast lanes keep DISPATCH_SLICE_SECONDS
    (30.0, 600.0, 240.0),   # 8 gaps
    (60.0, 600.0, 480.0),
    (120.0, 600.0, 550.0),  # as far as the job's time leaves room for the last lease (600 - 2 x 15 - 20)
    (60.0, 120.0, 70.0),    # a short job timeout bounds it
    (60.0, 60.0, 60.0),     # never below DISPATCH_SLICE_SECONDS
])
def test_slice_of_a_paced_lane_spans_several_gaps_within_the_job(gap: float, job_timeout: float,
                                                                  want: float) -> None:
    cfg = Config(slice_seconds=60.0, job_timeout=job_timeout, waha_timeout=15.0)
    assert slice_seconds(cfg, Limits(interval_min=gap, interval_max=gap)) == pytest.approx(want)


def test_sleeping_lanes_wake_on_their_fence_within_a_poll(redis_server: Redis) -> None:
    """Two lanes of campaign A and one of B sleep 30 s; A's fence moves: A's lanes wake within a
    poll, B's sleeps on (its short sleep then times out: False); a wake event set by the lane
    itself (lock lost) ends its sleep at once."""

    async def run() -> dict[str, Any]:
        r = aioredis.Redis.from_url(redis_server.url)
        watch = FenceWatch(r, every=0.1)
        a, b = "camp-a-fw", "camp-b-fw"
        await r.set(keys.fence(a), run_value(3))
        await r.set(keys.fence(b), run_value(1))
        try:
            ev_a1, ev_a2, ev_b, ev_own = (asyncio.Event() for _ in range(4))
            t0 = time.monotonic()
            sleeps = [asyncio.ensure_future(watch.sleep(a, 3, 30.0, ev_a1)),
                      asyncio.ensure_future(watch.sleep(a, 3, 30.0, ev_a2)),
                      asyncio.ensure_future(watch.sleep(b, 1, 1.0, ev_b)),
                      asyncio.ensure_future(watch.sleep(a, 3, 30.0, ev_own))]
            await asyncio.sleep(0.3)
            assert not any(s.done() for s in sleeps), "a sleep ended while its fence ran"
            ev_own.set()
            own = await asyncio.wait_for(sleeps[3], 1.0)
            await r.set(keys.fence(a), "stop:4")
            woke = await asyncio.wait_for(asyncio.gather(sleeps[0], sleeps[1]), 2.0)
            woke_after = time.monotonic() - t0
            timed_out = await asyncio.wait_for(sleeps[2], 2.0)
            return {"own": own, "woke": woke, "woke_after": woke_after, "b": timed_out,
                    "left": dict(watch._sleepers)}
        finally:
            await r.delete(keys.fence(a), keys.fence(b))
            await r.aclose()

    out = asyncio.run(run())
    assert out["own"] is True
    assert out["woke"] == [True, True] and out["woke_after"] < 2.0
    assert out["b"] is False  # its fence ran: the sleep simply ended
    assert out["left"] == {}


def test_supervisor_leaves_a_lapsed_lane_of_its_own_process_to_its_heartbeat(redis_server: Redis) -> None:
    """Two lanes whose beat lapsed and whose lock is gone: the one a slice of this process still
    beats for (a late event loop, not a dead owner) is not claimed; the other is (claimed, then
    dropped: it has no dispatch state)."""

    async def run() -> tuple[float | None, float | None, float]:
        r = ArqRedis.from_url(redis_server.url)
        queue = f"q-{time.monotonic_ns()}"
        beats = keys.lane_beats(queue)
        mine, other = "camp-mine:chip-1", "camp-other:chip-2"
        lapsed = time.time() * 1000 - 1000
        await r.zadd(beats, {mine: lapsed, other: lapsed})
        try:
            sup = Supervisor(Store(r, queue), lock_ttl=6.0, scan_every=1.0, local=lambda m: m == mine)
            assert await sup.scan() == []
            return await r.zscore(beats, mine), await r.zscore(beats, other), lapsed
        finally:
            await r.delete(beats)
            await r.aclose()

    mine_score, other_score, lapsed = asyncio.run(run())
    assert mine_score == lapsed  # left alone: its own heartbeat takes the lock back
    assert other_score is None  # claimed, then dropped (no dispatch state to take over)


def test_dispatch_finishes_with_its_last_lane_in_few_lane_reads(redis_server: Redis) -> None:
    """Lanes end in any order (a worker starts them in queue order, not the request's): the
    dispatch turns FINISHED with the last lane to end, never before, and the ends read a few lane
    hashes each, not all of them (all 10,000 per end was ~15 ms of worker CPU, quadratic overall)."""
    lanes = 300

    async def run() -> tuple[list[int], list[int]]:
        r = ArqRedis.from_url(redis_server.url)
        store = Store(r, f"q-{time.monotonic_ns()}")
        camp = f"camp-{time.monotonic_ns()}"
        chips = [f"chip-{i}" for i in range(lanes)]
        read: list[int] = []
        script = store._all_done

        async def counting(keys: list[str], args: list[Any]) -> Any:
            read.append(len(keys))
            return await script(keys=keys, args=args)

        store._all_done = counting  # type: ignore[assignment]
        req = pb.StartDispatchRequest(campaign_id=camp, epoch=3, lanes=[pb.LaneSpec(chip_id=c) for c in chips])
        await store.save_dispatch(req, pb.DISPATCH_STATE_RUNNING)
        await store.fences.set(camp, "run", 3)
        for c in chips:
            await store.set_lane(camp, c, state=pb.LANE_STATE_RUNNING)
        states: list[int] = []
        order = chips[::7] + [c for i, c in enumerate(chips) if i % 7]  # not the request's order
        try:
            for i, c in enumerate(order):
                await store.set_lane(camp, c, state=pb.LANE_STATE_FAILED if i % 5 == 0 else pb.LANE_STATE_FINISHED)
                await store.maybe_finish_dispatch(camp, 3, c)
                states.append(int((await store.dispatch_meta(camp))["state"]))
        finally:
            await r.delete(keys.dispatch(camp), *(keys.lane(camp, c) for c in chips))
            await r.aclose()
        return states, read

    states, read = asyncio.run(run())
    assert states[-1] == pb.DISPATCH_STATE_FINISHED
    assert all(s == pb.DISPATCH_STATE_RUNNING for s in states[:-1])
    assert sum(read) < 20 * lanes, sum(read)  # 12,900 when ends read from the successor to the end
