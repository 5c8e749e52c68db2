"""One lane = (campaign, chip), run as bounded arq job slices.

A slice leases small batches from DeliveryService and sends them through WAHA:

  choose the message ids (waha/message_ids.py, or WAHA's new-message-id) -> lease, which records
        them on the messages in the same statement (what an ATTEMPTING report does) BEFORE anything
        leaves, so an uncertain outcome can always be looked up later
        -> (messages carrying an earlier attempt's id: ask WAHA first; found -> SENT; media and
           messages left without an id take the careful way, ids + ATTEMPTING per batch)
        -> per message: pacing slot -> sleep -> seen -> typing -> send -> report
        -> or, at full speed (gap always 0, no camouflage): bursts of sends under one fence token

Every WAHA request is fenced (fences.py): atomic "epoch still current + register in flight".
Stopped by a fence, by a non-RUNNING campaign, by the slice clock or a cancellation, the lane
RELEASES what it has not finished. Slices chain as new arq jobs while work remains.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from arq.connections import ArqRedis

from dispatcher_service import fences as fences_mod
from dispatcher_service import keys as keys_mod
from dispatcher_service.config import Config
from dispatcher_service.delivery import DeliveryClient, DeliveryUnavailable, ReportBatcher
from dispatcher_service.logs import lane_ctx
from dispatcher_service.pacing import Limits, Pacer, Reservation
from dispatcher_service.store import LaneLock, Store
from dispatcher_service.waha import message_ids
from dispatcher_service.waha.client import (
    ChipRestricted,
    MessageRejected,
    SessionNotWorking,
    WahaClient,
    WahaError,
    WahaServerError,
    WahaTimeout,
)
from dispatcher_service.waha.transport import HttpClient
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb

log = logging.getLogger("dispatcher.lane")
T = TypeVar("T")

# Media sends cannot carry a pre-chosen id (not in WAHA's spec), so their ATTEMPTING id is a marker:
# a re-leased message carrying it cannot be looked up and becomes UNKNOWN instead of being resent.
UNVERIFIABLE_PREFIX = "unverifiable:"
OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
MAX_BATCH = 50
# Bursting lanes lease (and report) in larger batches: at full speed each lease and report costs the
# campaign service and PostgreSQL more per call than per message.
MAX_BATCH_BURST = 200
LOCK_RENEW_SECONDS = 5.0
FENCE_POLL_SECONDS = 1.0
# Batches grow from this size. With DISPATCH_MESSAGE_IDS=waha, a batch's new-message-id requests run
# concurrently, this many under one fence token: all of a chunk start together, so the token's TTL
# (one WAHA timeout + margin) covers every one of them.
ID_CHUNK = 10
ID_CHUNK_BURST = 25  # bursting lanes take ids for larger batches: fewer fence round trips
# An ended send's in-flight token (full-speed chips) is released by the lane's next reservation
# (one Redis call per message instead of two). Before any wait (sleep, report, lease) the lane
# releases it at once, and a timer this soon covers every other path, so a stop waiting for
# in-flight requests is never held back by a lane that went quiet (50 ms here doubled the Cancel
# p99 of `make bench`).
FOLD_RELEASE_SECONDS = 0.005
# Outcomes reported per ReportDeliveries (ATTEMPTING already recorded each WAHA id: a crash before
# the report is resolved by a lookup when the lease is retaken).
REPORT_BATCH = 10
# At full speed (no minimum gap) outcomes go in fewer, larger reports: each costs the campaign
# service a transaction on the campaign row.
REPORT_BATCH_FAST = 50
# Full speed (gap always 0, no camouflage): one fence token covers a burst of up to BURST sequential
# sends (one Redis step per burst instead of one per message), for at most BURST_SECONDS, so a stop
# waiting for in-flight requests waits for at most that (the lane is aborted by then anyway).
BURST = 25
BURST_SECONDS = 0.1
# Prefetch: while a batch is sent, the next one is leased, given its WAHA ids and recorded as
# ATTEMPTING, so the sends never wait for the campaign service; only when the current batch is
# expected to take at most this long (its lease must outlast that wait plus its own sends).
PREFETCH_AHEAD_SECONDS = 10.0
# A slice deferring its successor at least this long (a cap or a closed window) tells the campaign
# service until when (ReportLaneWait), so the watchdog does not restart the silent lane meanwhile.
LANE_WAIT_REPORT_SECONDS = 10.0
LANE_WAIT_MAX_SECONDS = 7 * 86400 - 60  # ReportLaneWait takes at most 7 days ahead (a longer wait is cut)


@dataclass
class WorkerEnv:
    """Process-wide resources of a worker (created in on_startup)."""

    cfg: Config
    redis: ArqRedis
    http: HttpClient
    delivery: DeliveryClient
    store: Store = field(init=False)
    fences: fences_mod.Fences = field(init=False)
    pacer: Pacer = field(init=False)
    reports: ReportBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.reports = ReportBatcher(self.delivery)
        self.store = Store(self.redis, self.cfg.queue_name)
        self.fences = self.store.fences
        self.pacer = Pacer(self.redis)


class ChipDown(Exception):
    """WAHA said 422: the session is not WORKING."""


class ChipBanned(Exception):
    """WAHA said 500 + error 463: the number is restricted."""


class SliceOver(Exception):
    """Stop this slice and continue in a new one after `defer` seconds."""

    def __init__(self, defer: float = 0.0, why: str = "") -> None:
        super().__init__(why)
        self.defer = defer


class CampaignNotRunning(Exception):
    """DeliveryService says the campaign is not RUNNING (or the epoch moved)."""

    def __init__(self, state: int) -> None:
        super().__init__(str(state))
        self.state = state


def _now_ts() -> dpb.DeliveryReport:
    r = dpb.DeliveryReport()
    r.time.seconds, r.time.nanos = divmod(time.time_ns(), 1_000_000_000)  # GetCurrentTime, cheaper
    return r


def _waha_id(resp: Any) -> str:
    """The message id of a WAHA send answer (some engines nest it as {_serialized: ...})."""
    if not isinstance(resp, dict):
        return ""
    v = resp.get("id")
    if isinstance(v, dict):
        return str(v.get("_serialized") or v.get("id") or "")
    return str(v or "")


def _ts_seconds(ts: Any) -> float:
    return float(ts.seconds) + ts.nanos / 1e9


@dataclass
class Prepared:
    """A leased batch; `todo` when every message got its WAHA id and ATTEMPTING is recorded."""

    resp: dpb.LeaseMessagesResponse
    todo: list[tuple[dpb.LeasedMessage, str]] | None = None


class Lane:
    """One slice of one lane."""

    def __init__(self, env: WorkerEnv, campaign_id: str, chip_id: str, epoch: int, job_id: str,
                 spec: pb.LaneSpec, camo: rpb.Camouflage) -> None:
        self.env = env
        self.cfg = env.cfg
        self.c = campaign_id
        self.chip = chip_id
        self.epoch = epoch
        self.job_id = job_id
        self.spec = spec
        self.ctx = lane_ctx(campaign_id, chip_id, epoch)
        self.limits = Limits.from_proto(spec.pacing if spec.HasField("pacing") else None)
        self.seen = camo.send_seen if camo.HasField("send_seen") else True
        self.typing = camo.typing if camo.HasField("typing") else True
        self.cps = camo.typing_chars_per_second if camo.HasField("typing_chars_per_second") else 12.0
        self.typing_max = camo.typing_max_seconds if camo.HasField("typing_max_seconds") else 8.0
        self.cps = self.cps if self.cps > 0 else 12.0
        self.waha = WahaClient(env.http, spec.waha_base_url, spec.waha_api_key, self.cfg.waha_timeout)
        self.session = spec.waha_session
        self.started_wall = time.time()
        t0 = time.monotonic()
        self.deadline = t0 + self.cfg.slice_seconds
        # Nothing may be in the air when arq's job timeout fires.
        self.hard_deadline = t0 + max(self.cfg.slice_seconds, self.cfg.job_timeout - 2 * self.cfg.waha_timeout - 2)
        self.held: dict[str, dpb.LeasedMessage] = {}
        self.reports: list[dpb.DeliveryReport] = []
        self.sent = 0
        self.failed = 0
        self.inflight: set[asyncio.Task[Any]] = set()
        # Sends that left for WAHA without a known answer yet: never RELEASED (the campaign service
        # clears the WAHA id on RELEASED); their lease expires and the next lease looks them up.
        self.maybe_sent: set[str] = set()
        # WAHA's 201 answers not yet turned into a SENT report (a send that finished after its lane
        # was cancelled); final() drops them, so this stays small however long the slice.
        self.send_ok: dict[str, dict[str, Any]] = {}
        # Latest lease end of messages left leased on purpose: the lane must come back after it.
        self.revisit_at = 0.0
        self.lock = LaneLock(env.redis, campaign_id, chip_id, job_id)
        self.lock_lost = False
        self.last_error = ""
        self.wait_reason = ""  # why the slice ended early (SliceOver), for ReportLaneWait
        # Whether WAHA's engine sends under the id we give it, so that a lookup by that id settles an
        # uncertain outcome (None: not asked yet; see _ids_kept).
        self.ids_kept: bool | None = None
        # A send token taken together with the pacing slot (reserve_send); the next send call uses it.
        self.pretoken: str | None = None
        # Outcome report running in the background while the lane goes on sending (flush_later).
        self.pending_flush: asyncio.Task[dpb.ReportDeliveriesResponse | None] | None = None
        self.lane_key = keys_mod.lane(campaign_id, chip_id)
        self.fence_key = keys_mod.fence(campaign_id)
        self.inflight_key = keys_mod.inflight(campaign_id)
        self.run_value = fences_mod.run_value(epoch)
        # Full speed (no minimum gap): an ended send's token waits for the next reservation to
        # release it (the release marks the chip's last send END; later is only more conservative).
        self.fold_release = self.limits.interval_min <= 0
        # Bursts: every gap is 0 and nothing happens before a send (no seen/typing).
        self.burst = self.limits.interval_max <= 0 and not self.seen and not self.typing
        self.report_batch = (MAX_BATCH_BURST if self.burst else REPORT_BATCH_FAST) if self.fold_release \
            else REPORT_BATCH
        self.burst_stop = False
        self.unreleased: str | None = None
        self.release_timer: asyncio.TimerHandle | None = None
        # PENDING messages of the lane after the last lease: no more ids are taken than can be used.
        self.remaining_hint: int | None = None
        # The next batch, being prepared while the current one is sent (its messages are in `held`).
        self.prefetch: asyncio.Task[Prepared] | None = None

    # -- fenced WAHA access ------------------------------------------------------------------------
    async def call(self, fn: Callable[[], Awaitable[T]], min_gap: float | None = None,
                   on_leave: Callable[[], None] | None = None) -> T:
        """Run one WAHA request under the fence (atomic check + in-flight registration).

        The request itself runs in a shielded task: cancelling the lane (arq abort, shutdown) never
        cuts a request half-way, and its in-flight token is removed only when it really ended.
        """
        token: str | None = None
        if min_gap is not None and self.pretoken is not None:
            token, self.pretoken = self.pretoken, None
        for _ in range(0 if token is not None else 10_000):
            if self.lock_lost:
                raise fences_mod.Stopped(self.c)
            r = await self.env.fences.acquire(
                self.c, self.epoch, self.cfg.waha_timeout + 2,
                pace_chip=self.chip if min_gap is not None else None, min_gap=min_gap or 0.0)
            if isinstance(r, str):
                token = r
                break
            await self.sleep(min(r + 0.001, 60.0))
        if token is None:
            raise SliceOver(1.0, "pacing wait did not end")
        tok = token
        pace_chip = self.chip if min_gap is not None else None
        if self.lock_lost:
            await self.env.fences.release(self.c, tok, pace_chip)
            raise fences_mod.Stopped(self.c)
        if on_leave is not None:
            on_leave()

        async def run() -> T:
            try:
                return await fn()
            finally:
                if pace_chip is not None and self.fold_release and self.unreleased is None:
                    self._defer_release(tok)
                else:
                    await asyncio.shield(self.env.fences.release(self.c, tok, pace_chip))

        task: asyncio.Task[T] = asyncio.ensure_future(run())
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return await asyncio.shield(task)

    def _defer_release(self, token: str) -> None:
        """Leave an ended send's token to the next reserve_send; release it soon anyway."""
        self.unreleased = token
        if self.release_timer is None:
            self.release_timer = asyncio.get_running_loop().call_later(FOLD_RELEASE_SECONDS, self._release_soon)

    def _take_unreleased(self) -> str | None:
        tok, self.unreleased = self.unreleased, None
        if self.release_timer is not None:
            self.release_timer.cancel()
            self.release_timer = None
        return tok

    def _release_soon(self) -> None:
        self.release_timer = None
        tok = self._take_unreleased()
        if tok is not None:
            self._spawn_release(tok)

    def _spawn_release(self, tok: str) -> None:
        task = asyncio.ensure_future(self.env.fences.release(self.c, tok, self.chip))
        self.inflight.add(task)  # the slice's cleanup waits for it like for a request
        task.add_done_callback(self.inflight.discard)

    async def release_now(self) -> None:
        """Release an ended send's token still held for folding (before anything slow)."""
        tok = self._take_unreleased()
        if tok is not None:
            await asyncio.shield(self.env.fences.release(self.c, tok, self.chip))

    async def sleep(self, seconds: float) -> None:
        """Sleep, re-checking the fence at least every second while time remains.

        No check after the last stretch: what follows a sleep is a fenced WAHA call (atomic check)
        or a loop that checks the fence itself, so a check here would only cost a round trip."""
        if seconds <= 0:
            return
        await self.release_now()
        end = time.monotonic() + seconds
        for _ in range(int(seconds / FENCE_POLL_SECONDS) + 3):
            rem = end - time.monotonic()
            if rem <= 0:
                break
            await asyncio.sleep(min(rem, FENCE_POLL_SECONDS))
            if self.lock_lost:
                raise fences_mod.Stopped(self.c)
            if end - time.monotonic() > 0.001 and not await self.env.fences.is_current(self.c, self.epoch):
                raise fences_mod.Stopped(self.c)

    # -- reports -----------------------------------------------------------------------------------
    def final(self, m: dpb.LeasedMessage, outcome: int, waha_id: str = "", reason: str = "") -> None:
        r = _now_ts()
        r.message_id = m.message_id
        r.outcome = outcome  # type: ignore[assignment]
        r.waha_message_id = waha_id
        r.failure_reason = reason
        self.reports.append(r)
        self.held.pop(m.message_id, None)
        self.maybe_sent.discard(m.message_id)
        self.send_ok.pop(m.message_id, None)  # an answer is kept only until its outcome is reported
        if outcome == dpb.DELIVERY_OUTCOME_SENT:
            self.sent += 1
        elif outcome in (dpb.DELIVERY_OUTCOME_FAILED, dpb.DELIVERY_OUTCOME_UNKNOWN):
            self.failed += 1
        level = logging.DEBUG if outcome == dpb.DELIVERY_OUTCOME_SENT else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s message=%s %s%s%s", self.ctx, m.message_id,
                    dpb.DeliveryOutcome.Name(outcome),  # type: ignore[arg-type]
                    f" waha_id={waha_id}" if waha_id else "", f" reason={reason!r}" if reason else "")

    async def flush(self, extra: list[dpb.DeliveryReport] | None = None, budget: float | None = None,
                    check: bool = True) -> None:
        """Send buffered reports (plus `extra`) in one RPC; stop when the campaign is no longer RUNNING."""
        await self.release_now()
        await self._settle(check)
        batch = self.reports + (extra or [])
        if not batch:
            return
        sent, failed = self.sent, self.failed
        resp = await self.env.reports.report(self.c, batch, budget=budget)
        self.reports = []
        self.sent = self.failed = 0
        if sent or failed:
            await self.env.store.incr_lane(self.c, self.chip, sent, failed)
        if check and (resp.campaign_state != rpb.CAMPAIGN_STATE_RUNNING or resp.epoch != self.epoch):
            raise CampaignNotRunning(resp.campaign_state)

    async def flush_later(self) -> None:
        """Report the buffered outcomes in the background while the lane goes on sending (one such
        report at a time). Safe because every WAHA id was recorded by ATTEMPTING before its send: a
        report that fails goes back into the buffer for the next flush, and one lost with the worker
        is resolved by a lookup when the lease is retaken."""
        if not self.reports:
            return
        if self.pending_flush is not None:
            if not self.pending_flush.done():
                return  # the outcomes wait for the next one
            await self._settle(True)  # done: no wait, only its answer is checked
        batch, sent, failed = self.reports, self.sent, self.failed
        self.reports = []
        self.sent = self.failed = 0
        self.pending_flush = asyncio.ensure_future(self._report_bg(batch, sent, failed))

    async def _report_bg(self, batch: list[dpb.DeliveryReport], sent: int,
                         failed: int) -> dpb.ReportDeliveriesResponse | None:
        try:
            resp = await self.env.reports.report(self.c, batch)
        except Exception as e:
            log.warning("%s background report failed (kept for the next one): %s", self.ctx, e)
            self.reports[:0] = batch
            self.sent += sent
            self.failed += failed
            return None
        if sent or failed:
            try:
                await self.env.store.incr_lane(self.c, self.chip, sent, failed)
            except Exception as e:  # lane counters are for GetDispatch only
                log.warning("%s lane counters not updated: %s", self.ctx, e)
        return resp

    async def _settle(self, check: bool) -> None:
        """Wait for the background report, if any; with `check`, stop when the campaign is no longer
        RUNNING under our epoch."""
        t = self.pending_flush
        if t is None:
            return
        resp = await asyncio.shield(t)
        self.pending_flush = None
        if check and resp is not None and (resp.campaign_state != rpb.CAMPAIGN_STATE_RUNNING
                                           or resp.epoch != self.epoch):
            raise CampaignNotRunning(resp.campaign_state)

    def attempting(self, m: dpb.LeasedMessage, waha_id: str) -> dpb.DeliveryReport:
        r = _now_ts()
        r.message_id = m.message_id
        r.outcome = dpb.DELIVERY_OUTCOME_ATTEMPTING
        r.waha_message_id = waha_id
        return r

    # -- the slice ---------------------------------------------------------------------------------
    async def run(self) -> str:
        """Run the slice; always cleans up (releases unsent leases, unlocks, chains the next slice)."""
        outcome = "error"
        defer = 5.0
        cancelled = False
        renew: asyncio.Task[None] | None = None
        locked = False
        try:
            if not await self.env.fences.is_current(self.c, self.epoch):
                outcome = "stopped"
                return outcome
            if not await self.lock.acquire():
                log.info("%s lane busy (another slice holds it); asked it to follow up", self.ctx)
                outcome = "busy"
                return outcome
            locked = True
            renew = asyncio.ensure_future(self._renew_lock())
            await self.env.store.set_lane(self.c, self.chip, state=pb.LANE_STATE_RUNNING, epoch=self.epoch,
                                          job=self.job_id, queued="")
            log.info("%s slice start job=%s", self.ctx, self.job_id)
            outcome, defer = await self._loop()
            return outcome
        except asyncio.CancelledError:
            cancelled = True
            outcome = "cancelled"
            raise
        except Exception as e:  # never leave leases hanging; next slice retries
            log.exception("%s slice error: %s", self.ctx, e)
            self.last_error = f"{type(e).__name__}: {e}"[:500]
            outcome = "error"
            return outcome
        finally:
            if renew is not None:
                renew.cancel()
            await asyncio.shield(self._cleanup(outcome, defer, cancelled, locked))

    async def _renew_lock(self) -> None:
        for _ in range(100_000):
            await asyncio.sleep(LOCK_RENEW_SECONDS)
            try:
                if not await self.lock.renew():
                    log.warning("%s lane lock lost; stopping sends", self.ctx)
                    self.lock_lost = True
                    return
            except Exception as e:  # Redis hiccup: the next renewal tries again
                log.warning("%s lock renewal failed: %s", self.ctx, e)

    def _per_msg(self) -> float:
        typing_est = min(self.typing_max, 4.0) if self.typing else 0.0
        return self.limits.mean_gap + typing_est + (0.2 if self.seen else 0.0) + 0.05

    def _batch(self, ahead: float = 0.0, most: int = MAX_BATCH) -> tuple[int, int]:
        """Batch size sendable well within the slice, and a lease that expires before arq would
        re-run this job after a crash (so the re-run finds the messages leasable again). `ahead`:
        seconds before the batch starts sending (a prefetched batch waits for the current one)."""
        per_msg = self._per_msg()
        remaining = max(1.0, self.deadline - time.monotonic() - ahead)
        top = MAX_BATCH_BURST if self.burst else MAX_BATCH
        n = max(1, min(most, top, int(remaining / per_msg) if per_msg > 0 else top))
        cap = self.started_wall + self.cfg.job_timeout + 5 - time.time()
        need = ahead + min(remaining, n * per_msg) + 2 * self.cfg.waha_timeout + 15
        lease = int(max(10, min(need, cap, 3600)))
        return n, lease

    async def _prepare(self, n: int, lease_s: int) -> Prepared:
        """Choose the message ids first, then lease a batch recording them in the same step (what
        ATTEMPTING does: durable before any send). Ready to send (`todo`) when every message got its
        id; a message with an earlier attempt's id (to look up), media or an existence check goes
        the careful way (_batch_send)."""
        k = 0 if self.cfg.check_exists else n if self.remaining_hint is None else min(n, self.remaining_hint)
        ids = await self._new_ids(k) if k > 0 else []
        resp = await self.env.delivery.lease(self.c, self.chip, self.epoch, n, lease_s, self.job_id, ids)
        for m in resp.messages:
            self.held[m.message_id] = m
        if resp.campaign_state != rpb.CAMPAIGN_STATE_RUNNING or resp.epoch != self.epoch:
            raise CampaignNotRunning(resp.campaign_state)
        self.remaining_hint = resp.remaining
        msgs = list(resp.messages)
        if msgs and all(m.attempt_waha_message_id for m in msgs):
            return Prepared(resp, [(m, m.attempt_waha_message_id) for m in msgs])
        return Prepared(resp)

    def _start_prefetch(self, sending: int) -> None:
        """Prepare the next batch while `sending` messages go out, when they go out soon enough."""
        ahead = sending * self._per_msg()
        if ahead > PREFETCH_AHEAD_SECONDS or time.monotonic() + ahead + 1.0 >= self.deadline:
            return
        # Growing batches: the first ones are small so the first sends leave early.
        self.prefetch = asyncio.ensure_future(self._prepare(*self._batch(ahead, max(ID_CHUNK, 2 * sending))))

    async def _settle_prefetch(self) -> None:
        """Wait for a prefetch still running (its messages land in `held`, to be released)."""
        t = self.prefetch
        if t is None:
            return
        if not t.done():
            await asyncio.wait([t], timeout=self.cfg.waha_timeout + self.env.delivery.call_timeout + 5)
        self.prefetch = None
        if not t.done():
            t.cancel()  # its lease, if any, expires: nothing is lost
            log.warning("%s prefetch did not end in time; cancelled", self.ctx)
        elif not t.cancelled() and t.exception() is not None:
            log.info("%s prefetch ended with %s", self.ctx, t.exception())

    async def _loop(self) -> tuple[str, float]:
        for _ in range(100_000):
            if time.monotonic() >= self.deadline:
                return "slice", 0.0
            try:
                pre = self.prefetch
                if pre is not None:
                    if not pre.done():
                        await self.release_now()
                    p = await asyncio.shield(pre)  # on an error it stays set: settled by the release
                    self.prefetch = None
                else:
                    if not await self.env.fences.is_current(self.c, self.epoch):
                        return "stopped", 0.0
                    p = await self._prepare(*self._batch(most=ID_CHUNK if self.fold_release else MAX_BATCH))
                resp = p.resp
                if not resp.messages:
                    if resp.remaining > 0:
                        await self.sleep(min(2.0, max(0.0, self.deadline - time.monotonic())))
                        continue
                    return "finished", 0.0
                log.info("%s leased %d (remaining %d)%s", self.ctx, len(resp.messages), resp.remaining,
                         " prepared" if p.todo is not None else "")
                if p.todo is None:
                    await self._batch_send(list(resp.messages))
                    await self.flush()
                    continue
                self._start_prefetch(len(p.todo))
                if self.burst:
                    await self._send_bursts(p.todo)
                else:
                    for m, mid in p.todo:
                        await self._send_one(m, mid)
                if self.prefetch is None:
                    await self.flush()
                else:
                    await self.flush_later()
            except fences_mod.Stopped:
                return "stopped", 0.0
            except CampaignNotRunning as e:
                return ("finished" if e.state == rpb.CAMPAIGN_STATE_COMPLETED else "stopped"), 0.0
            except SliceOver as e:
                self.wait_reason = str(e)
                return "slice", e.defer
            except ChipBanned as e:
                await self._release_held(f"chip restricted: {e}")
                await self._chip_state(rpb.CHIP_STATE_RESTRICTED, str(e))
                self.last_error = f"chip restricted (WhatsApp 463): {e}"[:500]
                return "chip_failed", 0.0
            except ChipDown as e:
                await self._release_held(f"chip unavailable: {e}")
                await self._chip_state(rpb.CHIP_STATE_UNAVAILABLE, str(e))
                self.last_error = f"session not WORKING (422): {e}"[:500]
                if not await self._wait_working():
                    return "backoff", 10.0
                await self._chip_state(rpb.CHIP_STATE_ACTIVE, "session WORKING again")
                await self.env.store.set_lane(self.c, self.chip, state=pb.LANE_STATE_RUNNING)
            except DeliveryUnavailable as e:
                self.last_error = f"campaign service unavailable: {e}"[:500]
                log.warning("%s %s", self.ctx, self.last_error)
                return "slice", 5.0
        return "slice", 0.0

    def _leave_leased(self, m: dpb.LeasedMessage) -> None:
        """Keep the lease (and the WAHA id recorded with it) and come back once it expired."""
        self.held.pop(m.message_id, None)
        end = _ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else time.time() + 60
        self.revisit_at = max(self.revisit_at, end)

    async def _release_held(self, reason: str) -> None:
        """Hand back what was not sent. A send that got its 201 after all is SENT; one whose answer
        is unknown is left leased (its recorded WAHA id is looked up when the lease is retaken)."""
        await self._settle_prefetch()  # a prefetched batch is held too: released with the rest
        await self.release_now()
        for m in list(self.held.values()):
            ok = self.send_ok.get(m.message_id)
            if ok is not None:
                self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=_waha_id(ok) or m.waha_message_id)
            elif m.message_id in self.maybe_sent:
                log.info("%s message=%s outcome uncertain: left leased for a lookup on the next lease",
                         self.ctx, m.message_id)
                self._leave_leased(m)
            else:
                self.final(m, dpb.DELIVERY_OUTCOME_RELEASED, reason=reason)
        try:
            await self.flush(check=False)
        except DeliveryUnavailable as e:
            log.warning("%s release report failed (leases will expire): %s", self.ctx, e)

    async def _chip_state(self, state: int, reason: str) -> None:
        """Tell the campaign service; wake the lanes of campaigns whose messages moved."""
        try:
            resp = await self.env.delivery.chip_state(self.chip, state, reason[:500])  # type: ignore[arg-type]
        except Exception as e:
            log.warning("%s ReportChipState(%s) failed: %s", self.ctx, rpb.ChipState.Name(state), e)  # type: ignore[arg-type]
            return
        log.info("%s chip state %s; redistributed=%s paused=%s", self.ctx, rpb.ChipState.Name(state),  # type: ignore[arg-type]
                 list(resp.redistributed_campaign_ids), list(resp.paused_campaign_ids))
        for cid in resp.redistributed_campaign_ids:
            try:
                n = await self.env.store.ensure_campaign(cid, except_chip=self.chip)
                log.info("campaign=%s chip=%s woke %d lanes after redistribution", cid, self.chip, n)
            except Exception as e:
                log.warning("campaign=%s wake lanes failed: %s", cid, e)

    async def _wait_working(self) -> bool:
        """Back off and re-check GET /api/sessions/{session} until WORKING, bounded by the slice."""
        await self.env.store.set_lane(self.c, self.chip, state=pb.LANE_STATE_BACKING_OFF,
                                      last_error=self.last_error)
        delay = 1.0
        for _ in range(1000):
            wait = delay * random.uniform(0.8, 1.2)
            if time.monotonic() + wait >= self.deadline:
                return False
            await self.sleep(wait)
            delay = min(delay * 2, 30.0)
            try:
                info = await self.call(lambda: self.waha.get_session(self.session))
            except WahaError as e:
                log.info("%s session check failed: %s", self.ctx, e)
                continue
            status = str(info.get("status", ""))
            log.info("%s session %s status %s", self.ctx, self.session, status)
            if status == "WORKING":
                return True
        return False

    # -- a batch -----------------------------------------------------------------------------------
    async def _lookup(self, m: dpb.LeasedMessage, waha_id: str) -> bool | None:
        """Does WAHA know this message id? None when it cannot be told (then: OUTCOME_UNKNOWN)."""
        ids = [waha_id]
        if not waha_id.startswith(("true_", "false_")):
            ids.append(f"true_{m.chat_id}_{waha_id}")
        for attempt in range(3):
            try:
                if not await self._ids_kept():
                    return None
                for i, mid in enumerate(ids):
                    try:
                        found = await self.call(functools.partial(self.waha.get_message, self.session, m.chat_id,
                                                                  mid))
                    except MessageRejected:
                        if i == 0:
                            raise
                        found = None
                    if found is not None:
                        return True
                return False
            except SessionNotWorking as e:
                raise ChipDown(str(e)) from e
            except ChipRestricted as e:
                raise ChipBanned(str(e)) from e
            except WahaError as e:
                log.info("%s message=%s lookup of %s failed (%s), attempt %d", self.ctx, m.message_id, waha_id,
                         e, attempt + 1)
                await self.sleep(min(4.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.5))
        return None

    async def _ids_kept(self) -> bool:
        """Does this WAHA's engine send under the id we chose (GET /api/server/version, asked once
        per slice, only when a lookup is needed)? If not, a lookup cannot tell and the message's
        outcome stays unknown rather than risking a second send."""
        if self.ids_kept is None:
            env = await self.call(self.waha.server_version)
            engine = str(env.get("engine") or "").upper()
            self.ids_kept = engine in message_ids.ENGINES_KEEPING_IDS
            if not self.ids_kept:
                log.warning("%s WAHA engine %r does not send under a chosen id: uncertain sends become %s",
                            self.ctx, engine, OUTCOME_UNKNOWN)
        return self.ids_kept

    def _sent_id(self, resp: Any, mid: str) -> str:
        """The id WAHA sent a message under. One that does not carry the id we chose means the
        engine ignores chosen ids: lookups by them are then not trusted (see _ids_kept)."""
        got = _waha_id(resp)
        if got and mid not in got and not mid.startswith(UNVERIFIABLE_PREFIX) and self.ids_kept is not False:
            self.ids_kept = False
            log.warning("%s WAHA sent under id %s, not the chosen %s: uncertain sends become %s", self.ctx, got,
                        mid, OUTCOME_UNKNOWN)
        return got or mid

    async def _new_ids(self, n: int) -> list[str]:
        """n message ids for sends about to be leased: made here (DISPATCH_MESSAGE_IDS=local, no WAHA
        request), or asked of WAHA (new-message-id) in fenced chunks of concurrent requests."""
        if self.cfg.message_ids == "local":
            return [message_ids.new_message_id() for _ in range(n)]
        out: list[str] = []

        async def chunk(size: int) -> list[str | BaseException]:
            return await asyncio.gather(*(self.waha.new_message_id(self.session) for _ in range(size)),
                                        return_exceptions=True)

        # Chunk after chunk, each under its own fence token taken before it starts.
        size = ID_CHUNK_BURST if self.burst else ID_CHUNK
        for k in range(0, n, size):
            got = await self.call(functools.partial(chunk, min(size, n - k)))
            errs = [e for e in got if isinstance(e, BaseException)]
            for cls, wrap in ((ChipRestricted, ChipBanned), (SessionNotWorking, ChipDown)):
                e = next((e for e in errs if isinstance(e, cls)), None)
                if e is not None:
                    raise wrap(str(e)) from e
            if errs:
                raise errs[0]
            out += [str(x) for x in got]
        return out

    async def _batch_send(self, batch: list[dpb.LeasedMessage]) -> None:
        todo: list[tuple[dpb.LeasedMessage, str]] = []
        for m in batch:
            if m.waha_message_id:
                if m.waha_message_id.startswith(UNVERIFIABLE_PREFIX):
                    self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: media send may have "
                               "reached WAHA and cannot be looked up")
                    continue
                found = await self._lookup(m, m.waha_message_id)
                if found is True:
                    self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=m.waha_message_id)
                elif found is None:
                    self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: earlier attempt "
                               f"{m.waha_message_id} could not be checked")
                else:
                    todo.append((m, m.waha_message_id))
                continue
            if self.cfg.check_exists and m.phone:
                try:
                    exists = await self.call(functools.partial(self.waha.check_exists, self.session, m.phone))
                except SessionNotWorking as e:
                    raise ChipDown(str(e)) from e
                except WahaError:
                    exists = True
                if not exists:
                    self.final(m, dpb.DELIVERY_OUTCOME_SKIPPED, reason="number is not on WhatsApp")
                    continue
            if m.HasField("media") and m.media.id:
                todo.append((m, UNVERIFIABLE_PREFIX + uuid.uuid4().hex))
                continue
            todo.append((m, m.attempt_waha_message_id))  # or, if none, taken below for the whole batch
        if not todo:
            return
        need = [i for i, (_, mid) in enumerate(todo) if not mid]
        for i, mid in zip(need, await self._new_ids(len(need)), strict=True):
            todo[i] = (todo[i][0], mid)
        # Recorded BEFORE any send leaves: a crash from here on can be resolved by looking the id up.
        await self.flush()  # finals first: an ATTEMPTING-only report takes no campaign lock
        await self.flush(extra=[self.attempting(m, mid) for m, mid in todo])
        for m, mid in todo:
            await self._send_one(m, mid)

    def _typing_seconds(self, m: dpb.LeasedMessage) -> float:
        if not self.typing or not m.text:
            return 0.0
        return max(0.0, min(len(m.text) / self.cps, self.typing_max))

    async def _send_one(self, m: dpb.LeasedMessage, mid: str) -> None:
        typing_s = self._typing_seconds(m)
        lead = typing_s + (0.3 if self.seen else 0.0)
        now = time.time()
        lease_end = _ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else now + 60
        slice_end_wall = now + (self.deadline - time.monotonic())
        media = m.HasField("media") and bool(m.media.id)
        if lead <= 0 and not media:
            # Nothing to do before the send: reserve the slot and, when it is due now, pass the fence
            # and take the send in the same atomic step (releasing the previous send, if still held).
            latest = min(slice_end_wall, lease_end - self.cfg.waha_timeout - 5)
            prev = self._take_unreleased()
            try:
                res, self.pretoken = await self.env.pacer.reserve_send(
                    self.chip, self.limits, self.lane_key, self.fence_key, self.inflight_key,
                    self.run_value, self.cfg.waha_timeout + 2, latest, prev_token=prev)
            except fences_mod.Stopped:
                raise  # the script ran: `prev` is released
            except BaseException:
                if prev is not None:  # cancelled or failed: the script may not have run (a release twice is harmless)
                    self._spawn_release(prev)
                raise
        else:
            await self.release_now()
            res = await self.env.pacer.reserve(self.chip, self.limits, lane_key=self.lane_key)
        if res is None:
            raise SliceOver(3600.0, "no sending window within the horizon")
        try:
            if self.pretoken is None:
                send_at = max(res.slot, now + lead)  # the camouflage is never cut short; the send waits for it
                if send_at > slice_end_wall or send_at + self.cfg.waha_timeout + 5 > lease_end:
                    await self.env.pacer.release(res)
                    defer = max(0.0, res.slot - lead - now - 2.0)
                    raise SliceOver(defer, "next slot is beyond this slice or lease")
                try:
                    if res.slot - lead - now > 1.0:
                        await self.flush()
                    await self.sleep(res.slot - lead - time.time())
                    await self._camouflage(m, res, typing_s)
                    await self.sleep(res.slot - time.time())
                except BaseException:
                    await self.env.pacer.release(res)
                    raise
            await self._send_with_retries(m, mid)
        finally:
            if self.pretoken is not None:  # taken with the slot but never used: free the chip and the fence
                tok, self.pretoken = self.pretoken, None
                await asyncio.shield(self.env.fences.release(self.c, tok, self.chip))
        if len(self.reports) >= self.report_batch:
            await self.flush_later()

    # -- full-speed bursts -------------------------------------------------------------------------
    async def _send_bursts(self, todo: list[tuple[dpb.LeasedMessage, str]]) -> None:
        """Send prepared text messages in bursts, each under one fence token (see BURST)."""
        i = 0
        for _ in range(10_000):
            if i >= len(todo):
                break
            if self.lock_lost:
                raise fences_mod.Stopped(self.c)
            now = time.time()
            if time.monotonic() >= self.deadline:
                raise SliceOver(0.0, "slice over")
            prev = self._take_unreleased()
            try:
                got = await self.env.pacer.reserve_burst(
                    self.chip, self.limits, self.lane_key, self.fence_key, self.inflight_key, self.run_value,
                    self.cfg.waha_timeout + BURST_SECONDS + 2, min(BURST, len(todo) - i), prev_token=prev)
            except fences_mod.Stopped:
                raise  # the script ran: `prev` is released
            except BaseException:
                if prev is not None:  # the script may not have run (a release twice is harmless)
                    self._spawn_release(prev)
                raise
            if got is None:
                raise SliceOver(3600.0, "no sending window within the horizon")
            if isinstance(got, float):  # window closed or cap reached until then
                if got > now + (self.deadline - time.monotonic()):
                    raise SliceOver(max(0.0, got - now - 2.0), "next slot is beyond this slice")
                await self.flush()
                await self.sleep(got - time.time())
                continue
            token, n = got
            task = asyncio.ensure_future(self._burst(todo[i:i + n], token))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            try:
                done, failure = await asyncio.shield(task)
            except asyncio.CancelledError:
                self.burst_stop = True  # the burst ends after its current request
                raise
            i += done
            if len(self.reports) >= self.report_batch:
                await self.flush_later()
            if failure is not None:
                m, mid = todo[i]
                i += 1
                await self._burst_failure(m, mid, failure)

    async def _burst(self, items: list[tuple[dpb.LeasedMessage, str]],
                     token: str) -> tuple[int, BaseException | None]:
        """Sequential sends under one token: (messages finished, the error that ended the burst on
        the next one). Runs shielded: a cancelled lane stops it between requests, never inside one."""
        until = time.monotonic() + BURST_SECONDS
        hard = self.hard_deadline - self.cfg.waha_timeout - 1  # nothing in the air at arq's job timeout
        done = 0
        try:
            for m, mid in items:
                if self.burst_stop or self.lock_lost or (done and time.monotonic() > until):
                    break
                if time.monotonic() > hard:
                    return done, SliceOver(0.0, "job time nearly over")
                lease_end = _ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else time.time() + 60
                if time.time() + self.cfg.waha_timeout + 2 > lease_end:
                    return done, SliceOver(0.0, "lease too close to expiry to send")
                self.maybe_sent.add(m.message_id)
                try:
                    r = await self.waha.send_text(self.session, m.chat_id, m.text, mid)
                except WahaError as e:
                    if isinstance(e, SessionNotWorking | ChipRestricted | MessageRejected):
                        self.maybe_sent.discard(m.message_id)  # WAHA answered: definitely not sent
                    return done, e
                self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=self._sent_id(r, mid))
                done += 1
            return done, None
        finally:
            if self.unreleased is None:
                self._defer_release(token)  # released by the next burst, or very soon
            else:
                self._spawn_release(token)

    async def _burst_failure(self, m: dpb.LeasedMessage, mid: str, e: BaseException) -> None:
        """The message a burst stopped at: classify like a single send, retry the uncertain ones."""
        if isinstance(e, SliceOver):
            raise e
        if isinstance(e, SessionNotWorking):
            raise ChipDown(str(e)) from e
        if isinstance(e, ChipRestricted):
            raise ChipBanned(str(e)) from e
        if isinstance(e, MessageRejected):
            self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA rejected the message (HTTP {e.status}): "
                       f"{e.body[:300]}")
            return
        if isinstance(e, WahaTimeout | WahaServerError):
            self.last_error = str(e)[:500]
            log.warning("%s message=%s send failed in a burst (%s); retrying", self.ctx, m.message_id, e)
            await self._send_with_retries(m, mid, failed=e)
            return
        if isinstance(e, WahaError):
            self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA error: {e}"[:500])
            return
        raise e

    async def _camouflage(self, m: dpb.LeasedMessage, res: Reservation, typing_s: float) -> None:
        """sendSeen -> startTyping -> wait (grows with the text) -> stopTyping; each step switchable."""
        try:
            if self.seen:
                await self.call(lambda: self.waha.send_seen(self.session, m.chat_id))
            if typing_s > 0:
                await self.call(lambda: self.waha.start_typing(self.session, m.chat_id))
                await self.sleep(typing_s)
                await self.call(lambda: self.waha.stop_typing(self.session, m.chat_id))
        except SessionNotWorking as e:
            raise ChipDown(str(e)) from e
        except ChipRestricted as e:
            raise ChipBanned(str(e)) from e
        except WahaError as e:  # cosmetic steps: never block the send
            log.info("%s message=%s camouflage step failed: %s", self.ctx, m.message_id, e)

    async def _media_payload(self, m: dpb.LeasedMessage) -> tuple[str, str, str]:
        got = await self.env.delivery.media(m.media.id)
        meta = got.media if got.HasField("media") else m.media
        return (meta.filename or m.media.filename or "file", meta.mime_type or m.media.mime_type
                or "application/octet-stream", base64.b64encode(got.content).decode())

    async def _settled_by_lookup(self, m: dpb.LeasedMessage, mid: str, last: str) -> bool:
        """Before resending after an uncertain answer, ask WAHA: found → SENT; cannot tell → UNKNOWN
        (never resend blindly). True when the message got its final outcome."""
        found = await self._lookup(m, mid)
        if found is True:
            self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=mid)
        elif found is None:
            self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: {last}")
        return found is not False

    async def _send_with_retries(self, m: dpb.LeasedMessage, mid: str, failed: WahaError | None = None) -> None:
        """Send with retries. `failed`: a first attempt (of a burst) already ended with this error."""
        media = m.HasField("media") and bool(m.media.id)
        payload = await self._media_payload(m) if media else None
        uncertain = isinstance(failed, WahaTimeout)
        last = str(failed) if failed is not None else ""
        for attempt in range(1 if failed is not None else 0, self.cfg.send_retries + 1):
            if attempt > 0:
                backoff = min(30.0, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if time.monotonic() + backoff + self.cfg.waha_timeout + 1 > self.hard_deadline:
                    # Out of time: leave it leased; the id recorded by ATTEMPTING is looked up when the
                    # lease is retaken (RELEASED would clear that id).
                    log.info("%s message=%s retry deferred to a later lease after: %s", self.ctx, m.message_id,
                             last)
                    self._leave_leased(m)
                    return
                await self.sleep(backoff)
                if not media and await self._settled_by_lookup(m, mid, last):
                    return
            try:
                if payload is not None:
                    fname, mt, data = payload
                    resp = await self._fenced_send(m, mid, functools.partial(
                        self.waha.send_media, self.session, m.chat_id, fname, mt, data, m.text, mid))
                else:
                    resp = await self._fenced_send(m, mid, lambda: self.waha.send_text(
                        self.session, m.chat_id, m.text, mid))
            except SessionNotWorking as e:
                raise ChipDown(str(e)) from e
            except ChipRestricted as e:
                raise ChipBanned(str(e)) from e
            except MessageRejected as e:
                self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA rejected the message (HTTP {e.status}): "
                           f"{e.body[:300]}")
                return
            except WahaTimeout as e:
                last = str(e)
                uncertain = True
                self.last_error = last[:500]
                log.warning("%s message=%s send timed out (attempt %d): %s", self.ctx, m.message_id, attempt + 1, e)
                if media:  # cannot be looked up: never resend blindly
                    self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: {last}")
                    return
                continue
            except WahaServerError as e:
                last = str(e)
                self.last_error = last[:500]
                log.warning("%s message=%s WAHA %d (attempt %d)", self.ctx, m.message_id, e.status, attempt + 1)
                continue
            except WahaError as e:
                self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA error: {e}"[:500])
                return
            self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=self._sent_id(resp, mid))
            return
        if uncertain and not media and await self._settled_by_lookup(m, mid, last):
            return
        self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA failed after {self.cfg.send_retries + 1} "
                   f"attempts: {last}"[:500])

    async def _fenced_send(self, m: dpb.LeasedMessage, mid: str,
                           fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The send itself: fence + chip minimum gap since the last send that actually left."""
        lease_end = _ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else time.time() + 60
        if time.time() + self.cfg.waha_timeout + 2 > lease_end:
            raise SliceOver(0.0, "lease too close to expiry to send")

        async def tracked() -> dict[str, Any]:
            r = await fn()
            self.send_ok[m.message_id] = r  # kept even if the lane was cancelled meanwhile
            return r

        try:
            return await self.call(tracked, min_gap=self.limits.interval_min,
                                   on_leave=lambda: self.maybe_sent.add(m.message_id))
        except (SessionNotWorking, ChipRestricted, MessageRejected):
            self.maybe_sent.discard(m.message_id)  # WAHA answered: definitely not sent
            raise

    # -- end of slice ------------------------------------------------------------------------------
    async def _report_wait(self, resume_at: float) -> None:
        """Tell the campaign service this lane holds off on purpose until `resume_at` (a cap or a
        closed window), so its watchdog does not take the silence for a stall."""
        try:
            resp = await self.env.delivery.lane_wait(self.c, self.chip, self.epoch, resume_at, self.wait_reason)
        except Exception as e:  # best effort: at worst the watchdog restarts the lane, which is harmless
            log.warning("%s ReportLaneWait failed: %s", self.ctx, e)
            return
        log.info("%s waits until %.0f (%s)%s", self.ctx, resume_at, self.wait_reason,
                 "" if resp.recorded else ": not recorded, the campaign moved on")

    async def _cleanup(self, outcome: str, defer: float, cancelled: bool, locked: bool) -> None:
        try:
            await self._settle_prefetch()
            if self.inflight:  # let requests that left finish (bounded by the WAHA timeout)
                await asyncio.wait(list(self.inflight), timeout=self.cfg.waha_timeout + 2)
            await self.release_now()
            if self.held:
                await self._release_held(f"lane {outcome}")
            elif self.reports or self.pending_flush is not None:
                try:
                    await self.flush(check=False, budget=20.0)
                except Exception as e:
                    log.warning("%s final report failed: %s", self.ctx, e)
        except Exception as e:
            log.warning("%s cleanup reports failed: %s", self.ctx, e)
        if outcome in ("busy",):
            return
        store = self.env.store
        try:
            current = await self.env.fences.is_current(self.c, self.epoch)
            state = {
                "finished": pb.LANE_STATE_FINISHED, "chip_failed": pb.LANE_STATE_FAILED,
                "backoff": pb.LANE_STATE_BACKING_OFF, "stopped": pb.LANE_STATE_STOPPED,
            }.get(outcome, pb.LANE_STATE_QUEUED)
            if not current:
                state = pb.LANE_STATE_STOPPED
            lane = await store.lane_hash(self.c, self.chip)
            mine = not lane.get("epoch") or int(lane["epoch"]) <= self.epoch
            if locked and mine:
                fields: dict[str, str | int | float] = {"state": state}
                if self.last_error:
                    fields["last_error"] = self.last_error
                await store.set_lane(self.c, self.chip, **fields)
            wanted = await self.lock.release() if locked else False
            if wanted:  # a slice (maybe of a newer epoch) found us busy: make sure the lane goes on
                jid = await store.ensure_lane(self.c, self.chip)
                log.info("%s lane was wanted meanwhile; follow-up job %s", self.ctx, jid)
            if cancelled:
                return  # arq re-runs this very job (shutdown) or it was aborted by a stop
            await store.job_done(self.c, self.job_id)
            if not current or outcome in ("stopped", "chip_failed"):
                return
            # Messages left leased (uncertain outcome) by this or an earlier slice: come back when
            # their lease expired so they are looked up, or the campaign would never complete.
            revisit = max(self.revisit_at, float(lane.get("revisit_at") or 0))
            if revisit > float(lane.get("revisit_at") or 0):
                await store.set_lane(self.c, self.chip, revisit_at=revisit)
            if outcome == "finished" and revisit > time.time() - 1.0:
                outcome, defer = "slice", max(0.0, revisit - time.time() + 1.0)
            if outcome in ("slice", "backoff", "error") and not wanted:
                jid = await store.enqueue_lane(self.c, self.chip, self.epoch, defer=defer)
                log.info("%s next slice %s in %.1fs (%s%s)", self.ctx, jid, defer, outcome,
                         ", wanted" if wanted else "")
                if outcome == "slice" and defer >= LANE_WAIT_REPORT_SECONDS:
                    await self._report_wait(time.time() + min(defer, LANE_WAIT_MAX_SECONDS))
            elif outcome == "finished" and not wanted:
                await store.maybe_finish_dispatch(self.c, self.epoch, self.chip)
            log.info("%s slice end job=%s outcome=%s", self.ctx, self.job_id, outcome)
        except Exception as e:
            log.exception("%s cleanup failed: %s", self.ctx, e)


async def run_lane(ctx: dict[str, Any], campaign_id: str, chip_id: str, epoch: int, n: int) -> str:
    """arq job: one slice of lane (campaign, chip) under `epoch`."""
    env: WorkerEnv = ctx["env"]
    job_id = str(ctx.get("job_id") or f"lane:{campaign_id}:{chip_id}:{epoch}:{n}")
    got = await env.store.load_lane_spec(campaign_id, chip_id)  # shared, parsed once per worker
    if got is None:
        log.info("%s no dispatch state; nothing to do", lane_ctx(campaign_id, chip_id, epoch))
        await env.store.job_done(campaign_id, job_id)
        return "gone"
    req, spec = got
    lane = Lane(env, campaign_id, chip_id, epoch, job_id, spec, req.camouflage)
    return await lane.run()
