"""Chip warm-up (issue 15): a chip's daily cap starts low and grows each day it sends.

The rule is run directly in Redis (lua/warmup.lua through the pacing scripts, days made by writing
the chip's warm-up hash, so no test waits for a day), then across two campaigns on two workers of a
real stack with 2-second warm-up days (WARMUP_DAY_SECONDS), and GetChip's view of today's cap."""

from __future__ import annotations

import collections
import math
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from campaign_service import warmup
from devstack.servers import Redis as RedisServer
from dispatcher_service import keys, scripts
from dispatcher_service.pacing import Limits, Pacer
from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import Ops, _next_phone, run_with_redis
from tests.test_campaign_templates import field_violations
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import resources_pb2 as res

DAY = 86400.0
PLAN = (3, 2.0, 10)  # start, factor, max: caps 3, 6, 10, 10...


def chip_keys() -> tuple[str, str, str, str]:
    c = f"test-{uuid.uuid4().hex[:10]}"
    return c, keys.pace(c), keys.pace_log(c), keys.warmup(c)


async def reserve(r: Redis, pace: str, plog: str, warm: str, token: str, plan: tuple[int, float, int] = PLAN,
                  day: float = DAY) -> float:
    """pace_reserve with gap 0, no other cap, no window: the slot the warm-up allows."""
    raw = await scripts.register(r, "pace_reserve")(keys=[pace, plog, warm],
                                                    args=[0, 0, 0, token, -1, day, *plan])
    return float(raw)


def today_index() -> int:
    return math.floor(time.time() / DAY)


# -- the rule, in Redis --------------------------------------------------------------------------------


def test_day_one_cap_then_the_next_day_at_its_start(redis_server: RedisServer) -> None:
    """Day 1 allows `start` sends; the next one lands at the next warm-up day's start."""
    async def go(r: Redis) -> None:
        _, pace, plog, warm = chip_keys()
        t0 = time.time()
        slots = [await reserve(r, pace, plog, warm, f"t{i}") for i in range(4)]
        assert all(t0 - 1 <= s <= time.time() + 1 for s in slots[:3])
        assert slots[3] == (today_index() + 1) * DAY
        assert await r.hget(warm, f"d:{today_index()}") == "3"
    run_with_redis(redis_server, go)


def test_growth_after_sending_days_and_never_above_the_max(redis_server: RedisServer) -> None:
    """Reserving ahead: day 1 (today) 3, day 2 (tomorrow) 6, day 3 min(12, 10) = 10, day 4 10."""
    async def go(r: Redis) -> None:
        _, pace, plog, warm = chip_keys()
        slots = [await reserve(r, pace, plog, warm, f"t{i}") for i in range(3 + 6 + 10 + 10 + 1)]
        per_day = collections.Counter(math.floor(s / DAY) - today_index() for s in slots)
        assert [per_day[d] for d in range(5)] == [3, 6, 10, 10, 1]
    run_with_redis(redis_server, go)


def test_a_day_counts_only_with_a_send(redis_server: RedisServer) -> None:
    """Days over are folded into `done` only when they had a send; a released reservation is no send."""
    async def go(r: Redis) -> None:
        _, pace, plog, warm = chip_keys()
        today = today_index()
        # Yesterday sent, the day before had only a released reservation, a week ago sent.
        await r.hset(warm, mapping={f"d:{today - 1}": 4, f"d:{today - 2}": 0, f"d:{today - 7}": 1})
        for i in range(6):  # two sending days over: today is day 3
            await reserve(r, pace, plog, warm, f"t{i}")
        assert await r.hget(warm, "done") == "2"
        assert await r.hget(warm, f"d:{today - 1}") is None
        # day 3 -> cap min(10, 3*4) = 10: 6 reserved, 4 more fit today, the 11th goes to tomorrow.
        slots = [await reserve(r, pace, plog, warm, f"u{i}") for i in range(5)]
        assert [math.floor(s / DAY) - today for s in slots] == [0, 0, 0, 0, 1]
    run_with_redis(redis_server, go)


def test_released_reservations_give_the_day_back(redis_server: RedisServer) -> None:
    """An unused slot (Pacer.release) leaves the warm-up day, so a day of only released slots is no
    sending day and today's room comes back."""
    async def go(r: Redis) -> None:
        chip, *_ = chip_keys()
        p = Pacer(r, warmup_day=DAY)
        lim = Limits(0, 0, warmup_start=2, warmup_factor=2.0, warmup_max=8)
        a, b, c = [await p.reserve(chip, lim) for _ in range(3)]
        assert a is not None and b is not None and c is not None and c.warmup
        assert math.floor(c.slot / DAY) == today_index() + 1
        await p.release(c)
        assert await r.hget(keys.warmup(chip), f"d:{today_index() + 1}") == "0"
        await p.release(b)
        again = await p.reserve(chip, lim)
        assert again is not None and math.floor(again.slot / DAY) == today_index()
        # Python's formula (GetChip) agrees with the script's.
        state = await r.hgetall(keys.warmup(chip))
        plan = res.WarmupPlan(enabled=True, start_daily_cap=2, growth_factor=2.0, max_daily_cap=8)
        assert warmup.today(plan, res.Pacing(), state, time.time(), DAY) == warmup.Today(1, 2)
        assert warmup.today(plan, res.Pacing(), state, time.time() + DAY, DAY) == warmup.Today(2, 4)
    run_with_redis(redis_server, go)


def test_burst_is_bounded_by_todays_warmup_room(redis_server: RedisServer) -> None:
    async def go(r: Redis) -> None:
        _, pace, plog, warm = chip_keys()
        lane, fence, inflight = (f"test:{n}:{uuid.uuid4().hex[:8]}" for n in ("lane", "fence", "inflight"))
        await r.set(fence, "run:1")
        burst = scripts.register(r, "pace_reserve_burst")
        ks = [pace, plog, lane, fence, inflight, warm]
        assert await burst(keys=ks, args=[0, 0, "run:1", "b1", 5, 10, "", -1, DAY, *PLAN]) == "go:3"
        full = await burst(keys=ks, args=[0, 0, "run:1", "b2", 5, 10, "b1", -1, DAY, *PLAN])
        assert full == f"slot:{(today_index() + 1) * DAY:.0f}"
        # A burst that sent 1 of its 3 gives the other 2 back: today has room for 2 again.
        ret = scripts.register(r, "pace_burst_return")
        assert await ret(keys=[plog, warm], args=["b1", 1, 3, DAY]) == 2
        assert await r.hget(warm, f"d:{today_index()}") == "1"
        assert await burst(keys=ks, args=[0, 0, "run:1", "b4", 5, 10, "", -1, DAY, *PLAN]) == "go:2"
        # Without the warm-up arguments the script is as before (no warm-up cap).
        assert await burst(keys=ks[:5], args=[0, 0, "run:1", "b3", 5, 10, "", -1]) == "go:10"
    run_with_redis(redis_server, go)


def test_cap_formula() -> None:
    plan = res.WarmupPlan(enabled=True, start_daily_cap=20, growth_factor=1.5, max_daily_cap=1000)
    assert [warmup.cap(plan, k) for k in (1, 2, 3, 4, 11, 12, 5000)] == [20, 30, 45, 67, 1000, 1000, 1000]


# -- the API ----------------------------------------------------------------------------------------


def register(api: Ops, url: str, plan: res.WarmupPlan | None = None, **pacing: Any) -> res.Chip:
    chip = res.Chip(display_name="warm chip", phone=_next_phone(), waha_base_url=url,
                    waha_session=f"w-{uuid.uuid4().hex[:8]}", waha_api_key=SANDBOX_API_KEY, pacing=res.Pacing(**pacing))
    if plan is not None:
        chip.warmup.CopyFrom(plan)
    return api.chips.RegisterChip(chs.RegisterChipRequest(chip=chip), metadata=api.md)


def test_bad_plans_are_refused_naming_the_field(api: Ops, sandbox_url: str) -> None:
    cases = {
        "chip.warmup.start_daily_cap": res.WarmupPlan(enabled=True, start_daily_cap=-1),
        "chip.warmup.growth_factor": res.WarmupPlan(enabled=True, growth_factor=0.5),
        "chip.warmup.max_daily_cap": res.WarmupPlan(enabled=True, start_daily_cap=50, max_daily_cap=10),
    }
    for field, plan in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            register(api, sandbox_url, plan)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [f for f, _ in field_violations(e.value)]
    with pytest.raises(grpc.RpcError) as e:
        register(api, sandbox_url, None, warmup=res.WarmupPlan(enabled=True))
    assert [f for f, _ in field_violations(e.value)] == ["chip.pacing.warmup"]


def test_get_chip_shows_todays_effective_cap(api: Ops, sandbox_url: str, redis_server: RedisServer) -> None:
    """GetChip reads the sending days the dispatcher counted: day k's cap, tightened by max_per_day."""
    plan = res.WarmupPlan(enabled=True, start_daily_cap=10, growth_factor=2.0, max_daily_cap=70)
    chip = register(api, sandbox_url, plan)
    assert (chip.warmup_day, chip.effective_daily_cap) == (1, 10)
    assert chip.warmup == plan
    r = redis_sync.Redis.from_url(redis_server.url)
    today = math.floor(time.time() / DAY)
    r.hset(keys.warmup(chip.id), mapping={"done": 2, f"d:{today - 1}": 5, f"d:{today}": 3})
    got = api.get_chip(chip.id)
    assert (got.warmup_day, got.effective_daily_cap) == (4, 70)  # 10 * 2^3 = 80 -> the max, 70
    capped = register(api, sandbox_url, plan, max_per_day=15)
    r.hset(keys.warmup(capped.id), "done", 1)
    got = api.get_chip(capped.id)
    assert (got.warmup_day, got.effective_daily_cap) == (2, 15)  # 20 tightened by max_per_day
    listed = {c.id: c for c in api.chips.ListChips(chs.ListChipsRequest(), metadata=api.md).chips}
    assert (listed[chip.id].warmup_day, listed[capped.id].effective_daily_cap) == (4, 15)
    off = register(api, sandbox_url, res.WarmupPlan(enabled=False), max_per_day=40)
    assert (off.warmup_day, off.effective_daily_cap, off.warmup.enabled) == (0, 40, False)


# -- two workers, two campaigns, one chip -----------------------------------------------------------


WARM_DAY = 2.0


@pytest.fixture(scope="module")
def warm_stack(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    """Two workers, 2-second warm-up days, and warm-up on by default for new chips."""
    with isolated_stack("warmup", workers=2, WARMUP_DAY_SECONDS=str(WARM_DAY), WHAGO_WARMUP_DEFAULT="on") as st:
        yield st


@pytest.fixture()
def warm_api(warm_stack: IsolatedStack, api_key: str) -> Iterator[Ops]:
    yield Ops(warm_stack.campaign_channel, api_key)


def test_new_chips_get_the_default_plan(warm_api: Ops, sandbox_url: str) -> None:
    chip = register(warm_api, sandbox_url)
    assert chip.warmup == res.WarmupPlan(enabled=True, start_daily_cap=20, growth_factor=1.5, max_daily_cap=1000)
    assert (chip.warmup_day, chip.effective_daily_cap) == (1, 20)
    assert register(warm_api, sandbox_url, max_per_day=300).warmup.max_daily_cap == 300


def test_warmup_caps_hold_across_campaigns_and_workers(warm_stack: IsolatedStack, warm_api: Ops,
                                                       sandbox_url: str, control: SandboxControl) -> None:
    """One chip (caps 2, 4, 5 on its sending days), two campaigns (a burst lane and a paced lane) on
    two workers: 12 messages need four warm-up days, and no day holds more than its cap."""
    plan = res.WarmupPlan(enabled=True, start_daily_cap=2, growth_factor=2.0, max_daily_cap=5)
    chip = register(warm_api, sandbox_url, plan, interval_min_seconds=0.0, interval_max_seconds=0.0)
    camps = [warm_api.campaign([chip]), warm_api.campaign([chip], interval=(0.01, 0.02))]
    for c in camps:
        warm_api.start_sending(c.id, 6)
    for c in camps:
        assert warm_api.wait_final(c.id, timeout=40).sent_count == 6
    times = sorted(r["ts"] for r in control.sends(session=chip.waha_session))
    assert len(times) == 12
    # Each send's reserved time (the pace log of this stack's Redis) by warm-up day.
    r = redis_sync.Redis.from_url(warm_stack.redis.url)
    slots = [s for _, s in r.zrange(keys.pace_log(chip.id), 0, -1, withscores=True)]
    assert len(slots) == 12
    per_day = sorted(collections.Counter(math.floor(s / WARM_DAY) for s in slots).items())
    caps = [warmup.cap(plan, k) for k in range(1, len(per_day) + 1)]
    assert all(n <= cap for (_, n), cap in zip(per_day, caps, strict=True)), (per_day, caps)
    assert len(per_day) >= 4
    assert times[-1] - times[0] > 2 * WARM_DAY - 0.5  # four days: nothing could finish within day 1 or 2
    # Every WAHA request of the chip was valid against the spec (the sandbox answers 400 otherwise).
    assert all(q["status"] < 400 for q in control.requests(session=chip.waha_session))
    got = warm_api.get_chip(chip.id)
    assert got.warmup_day >= len(per_day) and got.effective_daily_cap == 5
