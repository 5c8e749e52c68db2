"""The worker's per-tick Redis batching (redis_batch.py) against the real Redis of the session:
many lanes' steps leave as one pipeline, each caller gets its own reply or its own error, and a
script Redis lost (restart, SCRIPT FLUSH) is loaded again."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError, ResponseError

from devstack.servers import Redis as RedisServer
from dispatcher_service import keys
from dispatcher_service.fences import Fences, Stopped
from dispatcher_service.pacing import Limits, Pacer
from dispatcher_service.redis_batch import RedisBatch
from dispatcher_service.redis_conn import HiredisPackingConnection, hiredis_packing


def test_concurrent_steps_share_a_pipeline_and_keep_their_own_answers(redis_server: RedisServer) -> None:
    async def main() -> None:
        r = Redis.from_url(redis_server.url)
        try:
            batch = RedisBatch(r)
            fences = Fences(r, batch)
            run_c, stop_c = f"c-{uuid.uuid4().hex}", f"c-{uuid.uuid4().hex}"
            await fences.run(run_c, 1)
            await fences.run(stop_c, 1)
            await fences.set(stop_c, "stop", 1)
            chips = [f"chip-{uuid.uuid4().hex}" for _ in range(40)]
            got = await asyncio.gather(*(fences.acquire(run_c if i % 2 == 0 else stop_c, 1, 5.0, pace_chip=chip,
                                                         min_gap=1.0) for i, chip in enumerate(chips)),
                                       fences.is_current(run_c, 1), fences.is_current(stop_c, 1),
                                       return_exceptions=True)
            tokens, flags = got[:40], got[40:]
            assert all(isinstance(t, str) for t in tokens[0::2])
            assert all(isinstance(t, Stopped) for t in tokens[1::2])
            assert flags == [True, False]
            assert batch.pipelines >= 1 and batch.commands >= 42  # they left together
            assert await fences.pending(run_c) == 20
            await asyncio.gather(*(fences.release(run_c, t, chip) for t, chip in zip(tokens[0::2], chips[0::2],
                                                                                  strict=True)))
            assert await fences.pending(run_c) == 0
        finally:
            await r.aclose()
    asyncio.run(main())


def test_an_error_reaches_only_its_caller_and_lost_scripts_are_loaded_again(redis_server: RedisServer) -> None:
    async def main() -> None:
        r = Redis.from_url(redis_server.url)
        try:
            batch = RedisBatch(r)
            pacer = Pacer(r, batch=batch)
            chip = f"chip-{uuid.uuid4().hex}"
            await r.set(keys.pace(chip), "not a hash")  # the script's HGET on it fails: WRONGTYPE
            ok_chip = f"chip-{uuid.uuid4().hex}"
            bad, good = await asyncio.gather(pacer.reserve(chip, Limits(1.0, 1.0)),
                                             pacer.reserve(ok_chip, Limits(1.0, 1.0)), return_exceptions=True)
            assert isinstance(bad, ResponseError)
            assert good is not None and good.slot > 0
            await r.script_flush()
            again = await pacer.reserve(ok_chip, Limits(1.0, 1.0))
            assert again is not None and again.slot >= good.slot + 1.0
            with pytest.raises(ResponseError):
                await pacer.reserve(chip, Limits(1.0, 1.0))
        finally:
            await r.aclose()
    asyncio.run(main())


async def running_campaign(r: Redis) -> tuple[Fences, str, str]:
    """Fences on `r`, a fresh campaign id whose fence says run (epoch 1), and a fresh chip id."""
    fences = Fences(r, RedisBatch(r))
    c, chip = f"c-{uuid.uuid4().hex}", f"chip-{uuid.uuid4().hex}"
    await fences.run(c, 1)
    return fences, c, chip


def test_a_send_released_without_waiting_is_gone_before_the_lane_awaits_anything(redis_server: RedisServer) -> None:
    """release_send_nowait (a paced send that ended) is queued in the caller's own step: a stop
    draining the campaign sees the token gone one pipeline later, also after Redis lost the script."""
    async def main() -> None:
        r = Redis.from_url(redis_server.url)
        try:
            fences, c, chip = await running_campaign(r)
            for flush_scripts in (False, True):
                token = await fences.acquire(c, 1, 5.0, pace_chip=chip, min_gap=0.0)
                assert isinstance(token, str) and await fences.pending(c) == 1
                if flush_scripts:
                    await r.script_flush()
                done = fences.release_send_nowait(c, token, chip)
                await done
                assert await fences.pending(c) == 0
                assert await r.hget(keys.pace(chip), "busy_token") is None  # the chip is free again
        finally:
            await r.aclose()
    asyncio.run(main())


def test_concurrent_commands_are_not_serialized_by_the_connection_pool(redis_server: RedisServer) -> None:
    """redis-py 5.3 took a pool-wide asyncio lock around every connection checkout, held across a
    read that always yields to the event loop: concurrent commands left one per loop iteration or
    two, and a busy worker's fence releases waited hundreds of ms behind each other (the `pause`
    figure's tail; redis-py issue #3692). Counted in loop iterations, not time: every checkout of
    a warm pool is done within a few."""
    async def main() -> None:
        r = Redis.from_url(redis_server.url)
        pool = r.connection_pool
        n = 40
        try:
            await asyncio.gather(*(r.get("k") for _ in range(n)))  # n connected connections in the pool
            checkouts = [asyncio.ensure_future(pool.get_connection("GET")) for _ in range(n)]
            for _ in range(8):
                await asyncio.sleep(0)
            done = sum(t.done() for t in checkouts)
            for conn in await asyncio.gather(*checkouts):
                await pool.release(conn)
            assert done == n, f"{done} of {n} concurrent checkouts done after 8 loop iterations"
        finally:
            await r.aclose()
    asyncio.run(main())


def test_a_send_token_taken_for_a_cancelled_lane_is_released(redis_server: RedisServer) -> None:
    """arq aborting a lane at a stop may cancel it while its fence acquire is on its way: the script
    runs and registers the token all the same. It is released once Redis answered, instead of
    holding the campaign's stop back until the token expires."""
    async def main() -> None:
        r = Redis.from_url(redis_server.url)
        try:
            fences, c, chip = await running_campaign(r)
            warm = f"chip-{uuid.uuid4().hex}"  # the script loaded (a NOSCRIPT answer registers nothing)
            await fences.release(c, str(await fences.acquire(c, 1, 30.0, pace_chip=warm, min_gap=0.0)), warm)
            lane = asyncio.ensure_future(fences.acquire(c, 1, 30.0, pace_chip=chip, min_gap=0.0))
            await asyncio.sleep(0)  # queued in the batch, not sent yet
            lane.cancel()
            with pytest.raises(asyncio.CancelledError):
                await lane
            for _ in range(200):
                if await r.hget(keys.pace(chip), "last_actual") is not None:  # the acquire ran, then its release
                    break
                await asyncio.sleep(0.01)
            assert await r.hget(keys.pace(chip), "last_actual") is not None
            assert await fences.pending(c) == 0
            assert await r.hget(keys.pace(chip), "busy_token") is None
        finally:
            await r.aclose()
    asyncio.run(main())


def test_the_worker_client_packs_with_hiredis_and_redis_gets_the_same_commands(redis_server: RedisServer) -> None:
    """hiredis_packing: new connections pack with hiredis; values of every type a lane sends
    (str, bytes, int, float, non-ASCII text) come back as redis-py's own packing stores them, in
    single commands, pipelines and scripts; a bad value is still redis-py's DataError."""
    async def main() -> None:
        plain = Redis.from_url(redis_server.url)
        fast = hiredis_packing(Redis.from_url(redis_server.url))
        k = f"pack-{uuid.uuid4().hex}"
        values: list[str | bytes | int | float] = ["ção", b"\x00\xff", -5, 2**70, 1e-7, 0.1 + 0.2, "a b"]
        try:
            for i, v in enumerate(values):
                await plain.hset(k, f"plain{i}", v)  # type: ignore[misc]
            pipe = fast.pipeline(transaction=True)
            for i, v in enumerate(values):
                pipe.hset(k, f"fast{i}", v)
            await pipe.execute()
            got = await fast.hgetall(k)  # type: ignore[misc]
            assert all(got[f"fast{i}".encode()] == got[f"plain{i}".encode()] for i in range(len(values))), got
            assert await fast.eval("return ARGV[1] .. KEYS[1]", 1, k, "ção") == f"ção{k}".encode()  # type: ignore[misc]
            assert type(await fast.connection_pool.get_connection("PING")) is HiredisPackingConnection
            with pytest.raises(DataError):
                await fast.set(k, None)  # type: ignore[arg-type]
        finally:
            await plain.delete(k)
            await plain.aclose()
            await fast.aclose()

    asyncio.run(main())
