"""GetCampaign's coalesced reads (campaign_service/db/coalesce.py, repository ChangedViews): gets in
flight together share one query, each waiter gets its own key's answer, tenancy holds inside a
batch, and a failed query fails every waiter of its batch and no other. The batching itself with a
recording fetch; the query and the RPC against the session's PostgreSQL and campaign_service.
And what is not decoded or rendered again: a row whose version (xmin) is the one last read, a
rendered row only while identical."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest

from campaign_service import convert
from campaign_service.db.aio import LoopReads, asyncpg_dsn
from campaign_service.db.coalesce import Coalescer
from campaign_service.repository import campaigns as campaigns_repo
from tests.conftest import SANDBOX_API_KEY, auth
from tests.helpers import Ops
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import resources_pb2 as res


class Recorder:
    """A fetch that records its batches and answers key * 10 (none for 3), after `delay` s."""

    def __init__(self, delay: float = 0.01, fail: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail = fail or set()

    async def __call__(self, keys: list[int]) -> dict[int, int]:
        self.batches.append(list(keys))
        await asyncio.sleep(self.delay)
        if self.fail & set(keys):
            raise ConnectionError("database unavailable")
        return {k: k * 10 for k in keys if k != 3}


def test_gets_of_one_turn_share_one_fetch_and_each_gets_its_own_answer() -> None:
    fetch = Recorder()

    async def main() -> list[int | None]:
        c: Coalescer[int, int] = Coalescer(fetch)
        return await asyncio.gather(*(c.get(k) for k in [1, 2, 3, 2]))

    assert asyncio.run(main()) == [10, 20, None, 20]
    assert fetch.batches == [[1, 2, 3]]  # distinct keys, once each


def test_gets_asked_while_a_fetch_is_in_flight_go_out_together_after_it() -> None:
    fetch = Recorder(delay=0.05)

    async def main() -> list[int | None]:
        c: Coalescer[int, int] = Coalescer(fetch)
        first = asyncio.ensure_future(c.get(1))
        await asyncio.sleep(0.01)  # the first fetch is in flight
        later = [asyncio.ensure_future(c.get(k)) for k in (4, 5)]
        await asyncio.sleep(0)
        assert fetch.batches == [[1]], "nothing starts beside the query in flight"
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [10, 40, 50]
    assert fetch.batches == [[1], [4, 5]]


def test_a_lone_callers_reads_are_never_held() -> None:
    """A hold far longer than the test: one caller's gets, one at a time, still go out at once."""
    fetch = Recorder(delay=0.001)

    async def main() -> list[int | None]:
        c: Coalescer[int, int] = Coalescer(fetch, hold=600.0, fill=8)
        return [await asyncio.wait_for(c.get(k), 30) for k in (1, 2, 4)]

    assert asyncio.run(main()) == [10, 20, 40]
    assert fetch.batches == [[1], [2], [4]]


def test_reads_that_come_together_are_held_until_the_batch_fills_or_is_due() -> None:
    """Once batches show reads arriving together, keys asked on separate turns of the loop wait for
    company: a batch goes out when it has `fill` keys, or `hold` after its first key."""
    fetch = Recorder(delay=0.001)

    async def main() -> list[int | None]:
        c: Coalescer[int, int] = Coalescer(fetch, hold=0.2, fill=3)
        await asyncio.gather(*(c.get(k) for k in (1, 2, 4)))  # together: the next batches are held
        full = []
        for k in (6, 7, 8):  # one a turn: held until the third
            full.append(asyncio.ensure_future(c.get(k)))
            await asyncio.sleep(0)
        due = asyncio.ensure_future(c.get(9))  # alone: goes out when due
        return [*await asyncio.gather(*full), await asyncio.wait_for(due, 30)]

    assert asyncio.run(main()) == [60, 70, 80, 90]
    assert fetch.batches == [[1, 2, 4], [6, 7, 8], [9]]


def test_a_batch_that_fell_due_makes_the_next_wait_for_one_key_fewer() -> None:
    """Two callers, `fill` 3: once a held batch fell due with their two keys, the next goes out as
    soon as it has two, and a third key waits for the batch after."""
    fetch = Recorder(delay=0.001)

    async def main() -> None:
        c: Coalescer[int, int] = Coalescer(fetch, hold=0.05, fill=3)
        await asyncio.gather(*(c.get(k) for k in (1, 2, 4)))  # together: the next batches are held
        for keys in ((5, 6), (7, 8, 9)):
            asked = []
            for k in keys:  # one a turn
                asked.append(asyncio.ensure_future(c.get(k)))
                await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*asked), 30)

    asyncio.run(main())
    assert fetch.batches == [[1, 2, 4], [5, 6], [7, 8], [9]]


def test_a_failed_fetch_fails_its_own_waiters_only() -> None:
    fetch = Recorder(delay=0.02, fail={7})

    async def main() -> tuple[list[object], int | None]:
        c: Coalescer[int, int] = Coalescer(fetch)
        failed = await asyncio.gather(c.get(7), c.get(8), return_exceptions=True)
        return failed, await c.get(9)  # the next batch runs as usual

    failed, after = asyncio.run(main())
    assert all(isinstance(e, ConnectionError) for e in failed), failed
    assert after == 90


def test_a_cancelled_waiter_leaves_the_others_their_answers() -> None:
    fetch = Recorder(delay=0.05)

    async def main() -> list[int | None]:
        c: Coalescer[int, int] = Coalescer(fetch)
        gone = asyncio.ensure_future(c.get(1))
        kept = asyncio.ensure_future(c.get(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return [await kept, await c.get(1)]

    assert asyncio.run(main()) == [20, 10]


def test_a_rendered_campaign_is_reused_only_for_an_identical_row() -> None:
    now = datetime.now(UTC)
    values: dict[str, object] = {f: 0 for f in campaigns_repo.CampaignView._fields}
    values.update(id=str(uuid.uuid4()), name="n", description="", state_reason="", templates_json="[]",
                  settings_json="{}", chip_ids=[], schedule_time=None, created_at=now, updated_at=now,
                  started_at=None, completed_at=None)
    row = campaigns_repo.CampaignView(**values)  # type: ignore[arg-type]
    first = convert.campaign_view(row)
    assert convert.campaign_view(campaigns_repo.CampaignView(*row)) is first  # equal row, not the same object
    sent = convert.campaign_view(row._replace(sent_count=1))  # a counter moved, version and times did not
    assert sent is not first and sent.sent_count == 1 and first.sent_count == 0
    assert convert.campaign_view(row._replace(name="m")).name == "m"


def test_a_batch_answers_each_key_for_its_owner_only(api: Ops, sandbox_url: str, database_url: str) -> None:
    """One query for (campaign, owner), (campaign, another user), (unknown id, owner)."""
    camp = api.campaign([api.chip(sandbox_url, SANDBOX_API_KEY)], name="coalesced")

    async def main() -> dict[campaigns_repo.ViewKey, campaigns_repo.CampaignView]:
        reads = LoopReads(database_url, 2)
        await reads.start()
        try:
            owner = (await reads.fetch_all("SELECT user_id FROM campaigns WHERE id = $1", uuid.UUID(camp.id)))[0][0]
            keys = [(camp.id, owner), (camp.id, uuid.uuid4()), (str(uuid.uuid4()), owner)]
            return await campaigns_repo.ChangedViews(reads).fetch(keys)
        finally:
            await reads.close()

    found = asyncio.run(main())
    assert len(found) == 1
    (cid, _), view = next(iter(found.items()))
    assert cid == camp.id and view.id == camp.id and view.name == "coalesced"


def test_a_row_is_decoded_again_only_when_its_version_moved(api: Ops, sandbox_url: str, database_url: str) -> None:
    """The view held for an unchanged row comes back as is; any write to the row (here a counter
    moved by another connection, no version bump) is read in full by the next fetch."""
    camp = api.campaign([api.chip(sandbox_url, SANDBOX_API_KEY)], name="versioned")

    async def main() -> list[campaigns_repo.CampaignView]:
        reads = LoopReads(database_url, 2)
        await reads.start()
        try:
            owner = (await reads.fetch_all("SELECT user_id FROM campaigns WHERE id = $1", uuid.UUID(camp.id)))[0][0]
            views = campaigns_repo.ChangedViews(reads)
            key = (camp.id, owner)
            out = [(await views.fetch([key]))[key], (await views.fetch([key]))[key]]
            writer = await asyncpg.connect(asyncpg_dsn(database_url))
            try:
                await writer.execute("UPDATE campaigns SET sent_count = sent_count + 1 WHERE id = $1",
                                     uuid.UUID(camp.id))
            finally:
                await writer.close()
            out.append((await views.fetch([key]))[key])
            return out
        finally:
            await reads.close()

    first, again, moved = asyncio.run(main())
    assert again is first  # same row version: the held view, nothing decoded
    assert moved is not first and moved.sent_count == first.sent_count + 1


def test_concurrent_gets_of_two_users_each_see_only_their_own(
        api: Ops, api_key: str, sandbox_url: str, create_user: Callable[..., str], ports: dict[str, int]) -> None:
    """Many GetCampaigns at once (so they share queries), the owner's and another user's for the
    same ids: the owner gets each campaign, the other NOT_FOUND for every one."""
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    ids = [api.campaign([chip], name=f"mine {k}").id for k in range(8)]
    other = create_user()

    async def main() -> tuple[list[str], list[grpc.StatusCode]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['campaign']}") as ch:
            stub = cs_grpc.CampaignServiceStub(ch)

            async def get(cid: str, key: str) -> res.Campaign | grpc.StatusCode:
                try:
                    out: res.Campaign = await stub.GetCampaign(cs.GetCampaignRequest(campaign_id=cid),
                                                               metadata=auth(key), timeout=30)
                    return out
                except grpc.aio.AioRpcError as e:
                    return e.code()

            calls = [get(cid, key) for _ in range(5) for cid in ids for key in (api_key, other)]
            out = await asyncio.gather(*calls)
        mine = [r.id for r in out if not isinstance(r, grpc.StatusCode)]
        refused = [r for r in out if isinstance(r, grpc.StatusCode)]
        return mine, refused

    mine, refused = asyncio.run(main())
    assert sorted(mine) == sorted(ids * 5)
    assert refused == [grpc.StatusCode.NOT_FOUND] * (5 * len(ids))
