"""Dispatch and lane state in Redis, and the arq job bookkeeping shared by the server and the workers."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job

from dispatcher_service import fences as fences_mod
from dispatcher_service import keys, scripts
from dispatcher_service.redis_batch import RedisBatch, run_script
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb

log = logging.getLogger("dispatcher.store")
T = TypeVar("T")

LANE_FUNCTION = "run_lane"
REPLY_FUNCTION = "send_reply"  # replies.send_reply
STATE_TTL_SECONDS = 30 * 86400
REQUEST_CACHE_SIZE = 64
DONE_STATES = (pb.LANE_STATE_FINISHED, pb.LANE_STATE_FAILED)
DONE_SCAN_FIRST, DONE_SCAN_GROWTH = 4, 16  # maybe_finish_dispatch's steps: 4, 64, 1024, 16384 lanes


async def aw(x: Awaitable[T] | T) -> T:
    """redis-py types its asyncio commands as `Awaitable[X] | X`; this keeps mypy honest."""
    if inspect.isawaitable(x):
        return await x
    return x


def _s(v: bytes | str | None) -> str:
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class LaneLock:
    """A lane's lock: one slice at a time, held under a short TTL that the owner's heartbeat renews.

    With `queue`, the lock also takes over the lane for fencing: acquiring writes the owner token
    into the lane hash (fence_ok lets only that owner's requests leave) and every acquire/renew
    records the expiry in the heartbeat zset that takeover.py scans for silent owners; renewals are
    the worker's, for all its lanes at once (lane/heartbeat.py)."""

    redis: ArqRedis
    campaign_id: str
    chip_id: str
    owner: str
    ttl_ms: int = 20_000
    queue: str = ""
    batch: RedisBatch | None = None  # a worker's lanes take and let go of their locks through it

    def __post_init__(self) -> None:
        self._lock = scripts.register(self.redis, "lane_lock")
        self._unlock = scripts.register(self.redis, "lane_unlock")
        self.member = beat_member(self.campaign_id, self.chip_id)
        self.lock_key = keys.lane_lock(self.campaign_id, self.chip_id)
        self.lane_key = keys.lane(self.campaign_id, self.chip_id)

    def _keys(self) -> list[str]:
        ks = [self.lock_key, keys.lane_want(self.campaign_id, self.chip_id)]
        if self.queue:
            ks += [self.lane_key, keys.lane_beats(self.queue)]
        return ks

    async def acquire(self) -> bool:
        r = await run_script(self._lock, self._keys(), [self.owner, str(self.ttl_ms), self.member], self.batch)
        return int(r) == 1

    async def release(self) -> bool:
        """Unlock; True when another slice asked for the lane meanwhile (caller re-enqueues)."""
        r = await run_script(self._unlock, self._keys(), [self.owner, self.member], self.batch)
        return int(r) == 1


def beat_member(campaign_id: str, chip_id: str) -> str:
    """A lane's member in the heartbeat zset (ids are UUIDs: no colon inside)."""
    return f"{campaign_id}:{chip_id}"


def _lane_proto(chip_id: str, h: dict[str, str]) -> pb.Lane:
    lane = pb.Lane(chip_id=chip_id, state=int(h.get("state") or pb.LANE_STATE_QUEUED),  # type: ignore[arg-type]
                   sent_count=int(h.get("sent") or 0), failed_count=int(h.get("failed") or 0),
                   last_error=h.get("last_error", ""))
    nst = float(h.get("next_send_time") or 0)
    if nst > 0:
        lane.next_send_time.FromNanoseconds(int(nst * 1e9))
    return lane


class Loaded(NamedTuple):
    """A dispatch's request as parsed once per process, with what its lanes look up in it."""

    request: pb.StartDispatchRequest
    lane_of: dict[str, int]  # chip -> lane index
    lane_keys: list[str]  # the lane hashes, in the request's order (maybe_finish_dispatch)


class Store:
    """Dispatch state, lane state and lane-job bookkeeping."""

    def __init__(self, redis: ArqRedis, queue_name: str, batch: RedisBatch | None = None) -> None:
        self.redis = redis
        self.queue = queue_name
        self.fences = fences_mod.Fences(redis, batch)
        # A lane slice's own steps (lane state, dispatch revision, job bookkeeping): batched per
        # event-loop tick with the other lanes' in a worker, plain calls in the dispatcher server.
        self.cmd = batch.execute if batch is not None else redis.execute_command
        self._all_done = scripts.register(redis, "lanes_all_done")
        self._pause_lanes = scripts.register(redis, "lanes_pause")
        # campaign -> (revision, Loaded): one parsed request per worker process, shared
        # read-only by all its lanes (a 1000-lane request is ~150 KB; parsing it per lane cost memory
        # and CPU). The revision is rewritten by every save_dispatch.
        self._requests: dict[str, tuple[str, Loaded]] = {}
        self._fetching: dict[str, asyncio.Future[tuple[str, Loaded | None]]] = {}

    # -- dispatch ----------------------------------------------------------------------------------
    async def save_dispatch(self, req: pb.StartDispatchRequest, state: int) -> None:
        k = keys.dispatch(req.campaign_id)
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(k, mapping={"request": req.SerializeToString(), "epoch": req.epoch, "state": state,
                               "updated": time.time(), "rev": uuid.uuid4().hex})
            p.expire(k, STATE_TTL_SECONDS)
            await p.execute()

    async def set_dispatch_state(self, campaign_id: str, state: int, epoch: int | None = None) -> None:
        k = keys.dispatch(campaign_id)
        if not await self.redis.exists(k):
            return
        m: dict[str, str | int | float] = {"state": state, "updated": time.time()}
        if epoch is not None:
            m["epoch"] = epoch
        await aw(self.redis.hset(k, mapping=m))  # type: ignore[arg-type]

    async def load_request(self, campaign_id: str) -> pb.StartDispatchRequest | None:
        """The stored StartDispatchRequest (shared, cached per process: never mutate it)."""
        got = await self._load(campaign_id)
        return got[0] if got is not None else None

    async def load_lane_spec(self, campaign_id: str, chip_id: str) -> tuple[pb.StartDispatchRequest,
                                                                            pb.LaneSpec] | None:
        """(request, the chip's lane spec), or None when there is no dispatch or no such lane."""
        got = await self._load(campaign_id)
        if got is None:
            return None
        req, index, _ = got
        i = index.get(chip_id)
        return (req, req.lanes[i]) if i is not None else None

    async def _load(self, campaign_id: str) -> Loaded | None:
        k = keys.dispatch(campaign_id)
        rev = _s(await self.cmd("HGET", k, "rev"))
        hit = self._requests.get(campaign_id)
        if rev and hit is not None and hit[0] == rev:
            return hit[1]
        # Single flight: the lanes of a campaign start together, and each fetching and parsing the
        # request itself (~150 KB at 1,000 lanes, 1.5 MB at 10,000) cost lanes x request size in
        # memory and CPU at once; they share one fetch. One that started before our `rev` was read
        # may carry an older request: then we fetch again.
        for _ in range(3):
            fetch = self._fetching.get(campaign_id)
            if fetch is None:
                fetch = self._fetching[campaign_id] = asyncio.ensure_future(self._fetch(campaign_id))
                fetch.add_done_callback(functools.partial(self._fetched, campaign_id))
            got_rev, got = await asyncio.shield(fetch)
            if got is None or not rev or got_rev == rev:
                return got
            if self._fetching.get(campaign_id) is fetch:
                self._fetching.pop(campaign_id, None)
        return got

    def _fetched(self, campaign_id: str, fetch: asyncio.Future[tuple[str, Loaded | None]]) -> None:
        if self._fetching.get(campaign_id) is fetch:
            del self._fetching[campaign_id]

    async def _fetch(self, campaign_id: str) -> tuple[str, Loaded | None]:
        """(revision, Loaded) from Redis, parsed once and cached."""
        rev_raw, raw = await aw(self.redis.hmget(keys.dispatch(campaign_id), ["rev", "request"]))
        if not raw:
            self._requests.pop(campaign_id, None)
            return "", None
        req = pb.StartDispatchRequest()
        req.ParseFromString(raw if isinstance(raw, bytes) else raw.encode())
        loaded = Loaded(req, {spec.chip_id: i for i, spec in enumerate(req.lanes)},
                        [keys.lane(campaign_id, spec.chip_id) for spec in req.lanes])
        if rev_raw:
            if len(self._requests) >= REQUEST_CACHE_SIZE:
                self._requests.pop(next(iter(self._requests)))
            self._requests[campaign_id] = (_s(rev_raw), loaded)
        return _s(rev_raw), loaded

    async def dispatch_meta(self, campaign_id: str) -> dict[str, str]:
        h = await aw(self.redis.hgetall(keys.dispatch(campaign_id)))
        return {_s(k): _s(v) for k, v in h.items() if _s(k) != "request"}

    async def get_dispatch(self, campaign_id: str) -> pb.Dispatch | None:
        req = await self.load_request(campaign_id)
        if req is None:
            return None
        meta = await self.dispatch_meta(campaign_id)
        d = pb.Dispatch(campaign_id=campaign_id, epoch=int(meta.get("epoch") or req.epoch),
                        state=int(meta.get("state") or pb.DISPATCH_STATE_RUNNING))  # type: ignore[arg-type]
        chips = [spec.chip_id for spec in req.lanes]
        for chip, h in zip(chips, await self.lane_hashes(campaign_id, chips), strict=True):
            d.lanes.append(_lane_proto(chip, h))
        return d

    async def forget(self, campaign_id: str, chip_ids: list[str]) -> None:
        """Cancel: drop the dispatch state (the fence stays, so stale jobs still cannot send)."""
        ks = [keys.dispatch(campaign_id), keys.jobs(campaign_id)]
        for chip in chip_ids:
            ks += [keys.lane(campaign_id, chip), keys.lane_want(campaign_id, chip), keys.job_seq(campaign_id, chip)]
        await self.redis.delete(*ks)

    # -- lanes -------------------------------------------------------------------------------------
    async def set_lane(self, campaign_id: str, chip_id: str, **fields: str | int | float) -> None:
        k = keys.lane(campaign_id, chip_id)
        await asyncio.gather(self.cmd("HSET", k, *(x for kv in fields.items() for x in kv)),
                             self.cmd("EXPIRE", k, STATE_TTL_SECONDS))

    async def incr_lane(self, campaign_id: str, chip_id: str, sent: int, failed: int) -> None:
        k = keys.lane(campaign_id, chip_id)
        await asyncio.gather(*(self.cmd("HINCRBY", k, f, n) for f, n in (("sent", sent), ("failed", failed)) if n))

    async def pause_lanes(self, campaign_id: str, epoch: int, chip_ids: Sequence[str]) -> None:
        """Pause: the dispatch PAUSED under `epoch` and every lane not FINISHED or FAILED STOPPED, in
        one round trip whatever the number of lanes (one HGET and one HSET per lane, in turn, cost
        ~2 ms a lane under load; then two pipelines and the dispatch's own two steps, ~4 round trips)."""
        await self._pause_lanes(
            keys=[keys.dispatch(campaign_id), *(keys.lane(campaign_id, chip) for chip in chip_ids)],
            args=[int(pb.DISPATCH_STATE_PAUSED), epoch, time.time(), int(pb.LANE_STATE_STOPPED), STATE_TTL_SECONDS,
                  *(int(st) for st in DONE_STATES)])

    async def lane_hash(self, campaign_id: str, chip_id: str) -> dict[str, str]:
        h = await self.cmd("HGETALL", keys.lane(campaign_id, chip_id))
        return {_s(k): _s(v) for k, v in h.items()}

    async def lane_hashes(self, campaign_id: str, chip_ids: Sequence[str]) -> list[dict[str, str]]:
        """Several lane hashes in one round trip."""
        async with self.redis.pipeline(transaction=False) as p:
            for chip in chip_ids:
                p.hgetall(keys.lane(campaign_id, chip))
            got = await p.execute()
        return [{_s(k): _s(v) for k, v in h.items()} for h in got]

    async def get_lane(self, campaign_id: str, chip_id: str) -> pb.Lane:
        return _lane_proto(chip_id, await self.lane_hash(campaign_id, chip_id))

    async def maybe_finish_dispatch(self, campaign_id: str, epoch: int, chip_id: str = "") -> None:
        """Dispatch FINISHED once every lane of the current epoch is FINISHED or FAILED.

        Lanes end in no set order (10,000 lanes: their jobs start in queue order, not in the
        request's), so a check of every lane per lane end was quadratic: 10,000 keys built and sent
        per check, ~15 ms of the worker's CPU, for thousands of lanes ending together. The lanes
        are read from the caller's successor on, a few first and 16 times more each step, stopping
        at the first one still going: most ends cost one small step, the last ones a few."""
        got = await self._load(campaign_id)
        if got is None or not await self.fences.is_current(campaign_id, epoch):
            return
        _, index, ks = got
        n = len(ks)
        at = (index.get(chip_id, -1) + 1) % max(1, n)
        seen, size = 0, DONE_SCAN_FIRST
        while seen < n:
            take = min(size, n - seen)
            chunk = ks[at:at + take] + ks[:max(0, at + take - n)]
            if int(await self._all_done(keys=chunk, args=[0, *DONE_STATES])) != 1:
                return
            seen, at, size = seen + take, (at + take) % n, size * DONE_SCAN_GROWTH
        await self.set_dispatch_state(campaign_id, pb.DISPATCH_STATE_FINISHED)

    # -- jobs --------------------------------------------------------------------------------------
    async def enqueue_lane(self, campaign_id: str, chip_id: str, epoch: int, defer: float = 0.0) -> str | None:
        """Enqueue one slice of a lane as a NEW arq job (id lane:{c}:{chip}:{epoch}:{n}, n from INCR)."""
        return (await self.enqueue_lanes(campaign_id, [chip_id], epoch, defer=defer))[0]

    async def enqueue_lanes(self, campaign_id: str, chip_ids: Sequence[str], epoch: int, /, defer: float = 0.0,
                            **lane_fields: str | int | float) -> list[str]:
        """Enqueue one NEW arq job per lane in two round trips (INCRs, then one pipeline with the
        jobs, the bookkeeping set and the lane hashes), whatever the number of lanes.

        Same records as arq's enqueue_job (job key with expiry, queue zset score); ids come from INCR
        so they are never reused and arq's exists/WATCH guard is not needed. `lane_fields` go into
        each lane hash together with `queued`."""
        if not chip_ids:
            return []
        async with self.redis.pipeline(transaction=False) as p:
            for chip in chip_ids:
                p.incr(keys.job_seq(campaign_id, chip))
                p.expire(keys.job_seq(campaign_id, chip), STATE_TTL_SECONDS)
            seqs = (await p.execute())[::2]
        now_ms = int(time.time() * 1000)
        defer_ms = round(defer * 1000) if defer > 0 else 0
        score = now_ms + defer_ms
        expires_ms = defer_ms + self.redis.expires_extra_ms
        jids = [keys.job_id(campaign_id, chip, epoch, int(n)) for chip, n in zip(chip_ids, seqs, strict=True)]
        async with self.redis.pipeline(transaction=True) as p:
            p.sadd(keys.jobs(campaign_id), *jids)
            p.expire(keys.jobs(campaign_id), STATE_TTL_SECONDS)
            for chip, n, jid in zip(chip_ids, seqs, jids, strict=True):
                job = serialize_job(LANE_FUNCTION, (campaign_id, chip, epoch, int(n)), {}, None, now_ms,
                                    serializer=self.redis.job_serializer)
                p.psetex(job_key_prefix + jid, expires_ms, job)
                p.zadd(self.queue, {jid: score})
                k = keys.lane(campaign_id, chip)
                p.hset(k, mapping={**lane_fields, "queued": jid})
                p.expire(k, STATE_TTL_SECONDS)
            if not defer_ms:
                p.publish(keys.wake(self.queue), "1")  # idle workers poll now, not at their next tick
            await p.execute()
        return jids

    async def enqueue_replies(self, replies: Sequence[dpb.OptOutReply]) -> None:
        """One job per opt-out confirmation reply (replies.py); a webhook replayed for the same
        opt-out finds its job id taken (campaign_service answers a replay no reply anyway)."""
        for r in replies:
            await self.redis.enqueue_job(REPLY_FUNCTION, r.SerializeToString(),
                                         _job_id=keys.reply_job(r.chip_id, r.reply_id), _queue_name=self.queue)

    async def ensure_lane(self, campaign_id: str, chip_id: str) -> str | None:
        """Make sure a lane of the current epoch will run soon (redistributed work, wake-ups)."""
        f = await self.fences.get(campaign_id)
        if f.mode != "run":
            return None
        req = await self.load_request(campaign_id)
        if req is None or chip_id not in {s.chip_id for s in req.lanes}:
            return None
        h = await self.lane_hash(campaign_id, chip_id)
        queued = h.get("queued", "")
        if queued and f":{f.epoch}:" in queued:
            score = await self.redis.zscore(self.queue, queued)
            if score is not None and score <= time.time() * 1000 + 1000 \
                    and not await self.redis.exists(in_progress_key_prefix + queued):
                return queued  # already waiting to start now
        return await self.enqueue_lane(campaign_id, chip_id, f.epoch)

    async def ensure_campaign(self, campaign_id: str, except_chip: str | None = None) -> int:
        req = await self.load_request(campaign_id)
        if req is None:
            return 0
        n = 0
        for spec in req.lanes:
            if spec.chip_id != except_chip and await self.ensure_lane(campaign_id, spec.chip_id):
                n += 1
        return n

    async def job_done(self, campaign_id: str, job_id: str) -> None:
        await self.cmd("SREM", keys.jobs(campaign_id), job_id)

    async def stop_jobs(self, campaign_id: str) -> tuple[int, int]:
        """Revoke queued lane jobs and abort running ones (the fence already stops them from sending).

        Returns (revoked, aborted). Does not wait for aborted jobs to end: they may need to report
        to the campaign service, which may be holding a lock while it waits for us.
        """
        revoked = aborted = 0
        async with self.redis.pipeline(transaction=False) as p:  # one round trip: this is a stop's path
            # arq only drops abort marks of jobs it finds running; old marks would be rescanned forever.
            p.zremrangebyscore(abort_jobs_ss, "-inf", int(time.time() * 1000) - 300_000)
            p.smembers(keys.jobs(campaign_id))
            jids = [_s(m) for m in (await p.execute())[1]]
        if not jids:
            return 0, 0
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as p:
            for jid in jids:
                p.exists(in_progress_key_prefix + jid)
            running = await p.execute()
        async with self.redis.pipeline(transaction=True) as p:
            for jid, busy in zip(jids, running, strict=True):
                if busy:
                    p.zadd(abort_jobs_ss, {jid: now_ms})
                    aborted += 1
                    continue
                p.zrem(self.queue, jid)
                p.delete(job_key_prefix + jid)
                p.srem(keys.jobs(campaign_id), jid)
            res = await p.execute()
        i = 0
        for busy in running:
            if busy:
                i += 1
                continue
            revoked += int(res[i] or 0)
            i += 3
        return revoked, aborted
