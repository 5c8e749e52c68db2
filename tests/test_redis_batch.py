"""The worker's per-tick Redis batching (redis_batch.py) against the real Redis of the session:
many lanes' steps leave as one pipeline, each caller gets its own reply or its own error, and a
script Redis lost (restart, SCRIPT FLUSH) is loaded again."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from devstack.servers import Redis as RedisServer
from dispatcher_service import keys
from dispatcher_service.fences import Fences, Stopped
from dispatcher_service.pacing import Limits, Pacer
from dispatcher_service.redis_batch import RedisBatch


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
