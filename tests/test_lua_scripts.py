"""Each Lua script of the dispatcher (dispatcher_service/lua/*.lua), run directly against the real
Redis of the session: its KEYS/ARGV contract and its edge cases, without the Python around it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from devstack.servers import Redis as RedisServer
from dispatcher_service import scripts
from tests.helpers import run_with_redis

SCRIPTS = sorted(p.stem for p in scripts.LUA_DIR.glob("*.lua"))
FRAGMENTS = {"release_prev", "reserve_slot", "fence_ok", "lock_renew"}


def k(name: str) -> str:
    return f"test:{name}:{uuid.uuid4().hex[:10]}"


async def call(r: Redis, name: str, keys: list[str], args: list[Any]) -> Any:
    return await scripts.register(r, name)(keys=keys, args=args)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_loads_into_redis(redis_server: RedisServer, name: str) -> None:
    """Each file (with its fragments) compiles in Redis; a fragment alone defines a function only."""
    async def go(r: Redis) -> None:
        sha = await r.script_load(scripts.source(name))
        assert (await r.script_exists(sha)) == [True]
    run_with_redis(redis_server, go)


def test_includes_put_fragments_first_once() -> None:
    src = scripts.source("pace_reserve_send")
    assert src.index("local function reserve_slot") < src.index("local function release_prev") \
        < src.index("if ARGV[10] ~= ''")
    assert src.count("local function release_prev") == 1
    assert set(SCRIPTS) >= FRAGMENTS


def test_fence_set_epoch_rules(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        f = k("fence")
        assert await call(r, "fence_set", [f], ["run", 3, 0]) == "new"
        assert await call(r, "fence_set", [f], ["run", 3, 0]) == "same"
        assert await call(r, "fence_set", [f], ["run", 2, 0]) == "stale:run:3"
        assert await call(r, "fence_set", [f], ["stop", 2, 0]) == "stale:run:3"   # older stop, newer run
        assert await call(r, "fence_set", [f], ["stop", 3, 60]) == "new"
        assert 0 < await r.ttl(f) <= 60
        assert await call(r, "fence_set", [f], ["stop", 2, 0]) == "same"         # stop:>=E
        assert await call(r, "fence_set", [f], ["run", 3, 0]) == "stale:stop:3"  # a stopped epoch stays stopped
        assert await call(r, "fence_set", [f], ["run", 4, 0]) == "new"
        await r.set(f, "garbage")
        assert await call(r, "fence_set", [f], ["run", 1, 0]) == "new"          # unparsable: overwritten
    run_with_redis(redis_server, go)


def test_fence_acquire_and_pending(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        f, inflight = k("fence"), k("inflight")
        assert await call(r, "fence_acquire", [f, inflight], ["run:1", "t1", 5, 0]) == "stop"  # no fence
        await r.set(f, "run:1")
        assert await call(r, "fence_acquire", [f, inflight], ["run:2", "t1", 5, 0]) == "stop"  # other epoch
        assert await call(r, "fence_acquire", [f, inflight], ["run:1", "t1", 5, 0]) == "ok"
        assert await call(r, "fence_acquire", [f, inflight], ["run:1", "t2", 0.05, 0]) == "ok"
        assert await call(r, "fence_pending", [inflight], []) == 2
        await asyncio.sleep(0.1)
        assert await call(r, "fence_pending", [inflight], []) == 1    # t2 expired and was dropped
        assert await r.zrange(inflight, 0, -1) == ["t1"]
    run_with_redis(redis_server, go)


def test_fence_acquire_with_pace_enforces_the_gap_from_the_end_of_the_last_send(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        f, inflight, pace = k("fence"), k("inflight"), k("pace")
        await r.set(f, "run:1")
        assert await call(r, "fence_acquire", [f, inflight, pace], ["run:1", "s1", 5, 10]) == "ok"
        assert await r.hget(pace, "busy_token") == "s1"
        busy = await call(r, "fence_acquire", [f, inflight, pace], ["run:1", "s2", 5, 10])
        assert busy == "wait:10"                                       # a send is in flight
        assert await call(r, "fence_release_send", [inflight, pace], ["s1"]) == 1
        assert await r.hget(pace, "busy_token") is None and await r.zcard(inflight) == 0
        wait = await call(r, "fence_acquire", [f, inflight, pace], ["run:1", "s2", 5, 10])
        assert wait.startswith("wait:") and 9 < float(wait[5:]) <= 10  # measured from the release
        assert await call(r, "fence_acquire", [f, inflight, pace], ["run:1", "s3", 5, 0]) == "ok"  # no gap
    run_with_redis(redis_server, go)


def test_fence_release_send_by_a_non_owner_keeps_the_chip_busy(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        inflight, pace = k("inflight"), k("pace")
        await r.hset(pace, mapping={"busy_token": "owner", "busy_until": str(time.time() + 30), "last_actual": "5"})
        await r.zadd(inflight, {"owner": time.time() + 30, "other": time.time() + 30})
        await call(r, "fence_release_send", [inflight, pace], ["other"])
        assert await r.hget(pace, "busy_token") == "owner"
        assert await r.zrange(inflight, 0, -1) == ["owner"]
        assert float(await r.hget(pace, "last_actual")) > 5          # the pace still moves to now
        assert await r.ttl(pace) > 0
    run_with_redis(redis_server, go)


def test_pace_reserve_gap_caps_and_lane_hash(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        pace, plog, lane = k("pace"), k("plog"), k("lane")
        s1 = float(await call(r, "pace_reserve", [pace, plog, lane], [10, 0, 0, "a", -1]))
        s2 = float(await call(r, "pace_reserve", [pace, plog], [10, 0, 0, "b", -1]))
        assert s2 == pytest.approx(s1 + 10)
        assert float(await r.hget(lane, "next_send_time")) == s1
        capped = float(await call(r, "pace_reserve", [pace, plog], [0, 2, 0, "c", -1]))
        assert capped == pytest.approx(s1 + 3600.001, abs=0.01)      # 2 per hour: after the oldest + 1 h
        assert await call(r, "pace_reserve", [pace, plog], [0, 0, 0, "d", 0]) == "-1"  # no window at all
    run_with_redis(redis_server, go)


def test_pace_reserve_moves_into_a_window(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        pace, plog = k("pace"), k("plog")
        start = time.time() + 100
        slot = float(await call(r, "pace_reserve", [pace, plog], [0, 0, 0, "a", 1, start, start + 50]))
        assert slot == pytest.approx(start)
    run_with_redis(redis_server, go)


def test_pace_release_rolls_back_only_the_last_reservation(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        pace, plog = k("pace"), k("plog")
        s1 = float(await call(r, "pace_reserve", [pace, plog], [100, 0, 0, "a", -1]))
        await call(r, "pace_reserve", [pace, plog], [100, 0, 0, "b", -1])
        await call(r, "pace_release", [pace, plog], ["a"])           # not the last: only forgotten for caps
        assert await r.zrange(plog, 0, -1) == ["b"]
        await call(r, "pace_release", [pace, plog], ["b"])           # the last: `last` rolls back
        assert float(await r.hget(pace, "last")) == pytest.approx(s1)
        assert await r.zcard(plog) == 0
    run_with_redis(redis_server, go)


def test_pace_reserve_send_goes_stops_or_defers(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        pace, plog, lane, f, inflight = k("pace"), k("plog"), k("lane"), k("fence"), k("inflight")
        ks = [pace, plog, lane, f, inflight]
        args = lambda gap, tok, prev="": [gap, 0, 0, "r" + tok, "run:1", tok, 5, 0, time.time() + 60, prev, -1]  # noqa: E731
        assert await call(r, "pace_reserve_send", ks, args(0, "s1")) == "stop"  # no fence: nothing reserved
        assert await r.zcard(plog) == 0
        await r.set(f, "run:1")
        go1 = await call(r, "pace_reserve_send", ks, args(0, "s1"))
        assert go1.startswith("go:") and await r.zrange(inflight, 0, -1) == ["s1"]
        later = await call(r, "pace_reserve_send", ks, args(30, "s2", prev="s1"))
        assert later.startswith("slot:")                              # reserved for later, not sent
        assert await r.zcard(inflight) == 0                           # but s1 was released first
        await r.set(f, "stop:1")
        assert await call(r, "pace_reserve_send", ks, args(0, "s3")) == "stop"
    run_with_redis(redis_server, go)


def test_pace_reserve_burst_counts_caps_for_the_whole_burst(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        pace, plog, lane, f, inflight = k("pace"), k("plog"), k("lane"), k("fence"), k("inflight")
        ks = [pace, plog, lane, f, inflight]
        assert await call(r, "pace_reserve_burst", ks, [0, 0, "run:1", "b1", 5, 10, "", -1]) == "stop"
        await r.set(f, "run:1")
        assert await call(r, "pace_reserve_burst", ks, [3, 0, "run:1", "b1", 5, 10, "", -1]) == "go:3"
        assert await r.zcard(plog) == 3 and await r.zrange(inflight, 0, -1) == ["b1"]
        full = await call(r, "pace_reserve_burst", ks, [3, 0, "run:1", "b2", 5, 10, "b1", -1])
        assert full.startswith("slot:") and float(full[5:]) > time.time() + 3500
        assert await r.zcard(inflight) == 0                           # b1 released first
        closed = await call(r, "pace_reserve_burst", ks, [0, 0, "run:1", "b3", 5, 1, "", 1,
                                                           time.time() + 100, time.time() + 200])
        assert closed.startswith("slot:")                             # window not open yet
    run_with_redis(redis_server, go)


def test_lanes_all_done(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        lanes = [k("lane") for _ in range(3)]
        for ln in lanes:
            await r.hset(ln, "state", "4")
        assert await call(r, "lanes_all_done", lanes, [1, 4, 5]) == 1
        await r.hset(lanes[2], "state", "2")
        assert await call(r, "lanes_all_done", lanes, [0, 4, 5]) == 0
        await r.hset(lanes[2], "state", "5")
        assert await call(r, "lanes_all_done", lanes, [2, 4, 5]) == 1
    run_with_redis(redis_server, go)


def test_lane_lock_renew_and_unlock(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        lock, want = k("lock"), k("want")
        assert await call(r, "lane_lock", [lock, want], ["a", 10_000]) == 1
        assert await call(r, "lane_lock", [lock, want], ["a", 10_000]) == 1   # re-entrant for its owner
        assert await call(r, "lane_lock", [lock, want], ["b", 10_000]) == 0   # busy: b wants it
        assert await r.get(want) == "1"
        assert await call(r, "lane_lock_renew", [lock], ["b", 10_000]) == 0
        assert await call(r, "lane_lock_renew", [lock], ["a", 10_000]) == 1
        assert await call(r, "lane_unlock", [lock, want], ["b"]) == -1        # not b's lock
        assert await call(r, "lane_unlock", [lock, want], ["a"]) == 1         # released; b wanted it
        assert await r.exists(lock, want) == 0
        assert await call(r, "lane_lock", [lock, want], ["b", 10_000]) == 1
        assert await call(r, "lane_unlock", [lock, want], ["b"]) == 0         # nobody else wanted it
    run_with_redis(redis_server, go)


def test_lane_lock_renew_many_renews_only_the_locks_still_held(redis_server: RedisServer) -> None:
    """The worker's heartbeat (lane/heartbeat.py): one step for many lanes, one answer per lock. A
    lock that lapsed is taken back only while its lane hash still names the owner (nobody took the
    lane over: its process was just late to beat); lapsed and taken over, it stays lost."""
    async def go(r: Redis) -> None:
        beats, want = k("beats"), k("want")
        locks = [k("lock") for _ in range(4)]
        lanes = [k("lane") for _ in range(4)]
        for i, (lock, lane) in enumerate(zip(locks, lanes, strict=True)):
            assert await call(r, "lane_lock", [lock, want, lane, beats], [f"o{i}", 200, f"c:{i}"]) == 1
        await r.set(locks[1], "someone-else")                 # taken over (the lock held by another)
        await r.delete(locks[2])                              # lapsed, nobody took the lane: ours again
        await r.delete(locks[3])                              # lapsed and taken over (the hash names another)
        await r.hset(lanes[3], "owner", "takeover-slice")
        paired = [x for pair in zip(locks, lanes, strict=True) for x in pair]
        got = await call(r, "lane_lock_renew_many", [beats, *paired],
                         [10_000, "o0", "c:0", "o1", "c:1", "o2", "c:2", "o3", "c:3"])
        assert got == [1, 0, 1, 0]
        assert 9_000 < await r.pttl(locks[0]) <= 10_000
        assert 9_000 < await r.pttl(locks[2]) <= 10_000 and await r.get(locks[2]) == "o2"
        assert await r.get(locks[1]) == "someone-else" and await r.exists(locks[3]) == 0
        assert await r.zscore(beats, "c:0") > await r.zscore(beats, "c:1")  # type: ignore[operator]
        assert await call(r, "lane_lock_renew_many", [beats], [10_000]) == []
    run_with_redis(redis_server, go)


def test_jobs_claim_takes_only_due_queued_jobs_nobody_runs(redis_server: RedisServer) -> None:
    """The worker's batched start check (worker.py start_jobs), arq's per-job check for many."""
    async def go(r: Redis) -> None:
        queue = k("queue")
        now = int(time.time() * 1000)
        await r.zadd(queue, {"due": now - 10, "running": now - 10, "later": now + 60_000})
        await r.set("test:ip:running", "1")
        ids = ["due", "running", "later", "gone"]
        got = await call(r, "jobs_claim", [queue, *(f"test:ip:{i}" for i in ids)], [5000, now, *ids])
        assert got[0::2] == ["due"] and int(float(got[1])) == now - 10
        assert 0 < await r.pttl("test:ip:due") <= 5000
        assert await r.exists("test:ip:later", "test:ip:gone") == 0
        assert await call(r, "jobs_claim", [queue, "test:ip:due"], [5000, now, "due"]) == []  # claimed once
        await r.delete("test:ip:due", "test:ip:running")
    run_with_redis(redis_server, go)


def test_lane_takeover_fences_the_old_owner_in_the_step_that_takes_the_send(redis_server: RedisServer) -> None:
    """Takeover (takeover.py): the heartbeat zset, the claim, and fence_ok refusing a stale owner."""
    async def go(r: Redis) -> None:
        lock, want, lane, beats, fence, infl = k("lock"), k("want"), k("lane"), k("beats"), k("fence"), k("inf")
        await r.set(fence, "run:3")
        assert await call(r, "lane_lock", [lock, want, lane, beats], ["a", 200, "c:x"]) == 1
        assert await r.hget(lane, "owner") == "a" and await r.zscore(beats, "c:x") is not None
        assert await call(r, "fence_acquire", [fence, infl, lane], ["run:3#a", "t1", 5, 0]) == "ok"
        assert await call(r, "fence_acquire", [fence, infl], ["run:3", "t0", 5, 0]) == "ok"  # no owner given
        assert await call(r, "lane_takeover_claim", [beats, lock], ["c:x", 5000]) == 0   # a still beats
        await asyncio.sleep(0.25)                                                         # a goes silent
        assert await call(r, "lane_takeover_claim", [beats, lock], ["c:x", 5000]) == 1
        assert await call(r, "lane_takeover_claim", [beats, lock], ["c:x", 5000]) == 0   # claimed once
        assert await call(r, "lane_lock", [lock, want, lane, beats], ["b", 10_000, "c:x"]) == 1
        assert await call(r, "fence_acquire", [fence, infl, lane], ["run:3#a", "t2", 5, 0]) == "stop"
        assert await call(r, "lane_lock_renew", [lock, beats], ["a", 10_000, "c:x"]) == 0
        assert await call(r, "fence_acquire", [fence, infl, lane], ["run:3#b", "t3", 5, 0]) == "ok"
        await r.hset(lane, "lease_until", "1")
        assert await call(r, "lane_unlock", [lock, want, lane, beats], ["b", "c:x"]) == 0
        assert await r.zscore(beats, "c:x") is None and await r.hget(lane, "lease_until") is None
        assert await call(r, "lane_takeover_claim", [beats, lock], ["c:x", 5000]) == -1  # ended cleanly
    run_with_redis(redis_server, go)
