"""Every WAHA request of a lane goes through here: the stop fence (fences.py) checked and the
request registered as in flight in one atomic step, sleeps that re-check the fence, and the
release of a send's in-flight token (at once, or folded into the next reservation at full speed)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher_service import fences as fences_mod
from dispatcher_service import keys as keys_mod
from dispatcher_service.config import Config
from dispatcher_service.lane.common import (
    BURST_START,
    FENCE_POLL_SECONDS,
    FOLD_RELEASE_SECONDS,
    MAX_BATCH_BURST,
    REPORT_BATCH,
    REPORT_BATCH_FAST,
    SLICE_LEASE_MARGIN,
    SLICE_SENDS,
    Prepared,
    SliceOver,
    T,
    WorkerEnv,
)
from dispatcher_service.logs import lane_ctx
from dispatcher_service.pacing import Limits
from dispatcher_service.store import LaneLock
from dispatcher_service.waha.client import (
    WahaClient,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb

log = logging.getLogger("dispatcher.lane")


def slice_seconds(cfg: Config, limits: Limits) -> float:
    """DISPATCH_SLICE_SECONDS, or for a lane paced slower than that allows SLICE_SENDS of its gaps,
    as far as the job's time leaves room for the last lease (see SLICE_SENDS)."""
    paced = SLICE_SENDS * limits.mean_gap
    room = cfg.job_timeout - 2 * cfg.waha_timeout - SLICE_LEASE_MARGIN
    return max(cfg.slice_seconds, min(paced, room))


class FencedLane:
    """A lane slice's state and its fenced access to WAHA (the layers above add reports, chip
    health, the send step and the loop)."""

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
        self.waha = WahaClient(env.http, spec.waha_base_url, spec.waha_api_key, self.cfg.waha_timeout,
                               allowed_hosts=self.cfg.waha_hosts)
        self.session = spec.waha_session
        self.started_wall = time.time()
        t0 = time.monotonic()
        self.deadline = t0 + slice_seconds(self.cfg, self.limits)
        # Nothing may be in the air when arq's job timeout fires.
        self.hard_deadline = t0 + max(self.cfg.slice_seconds, self.cfg.job_timeout - 2 * self.cfg.waha_timeout - 2)
        self.next_send_min = 0.0  # wall time before which the chip's pace allows no send of ours
        self.held: dict[str, dpb.LeasedMessage] = {}
        self.reports: list[dpb.DeliveryReport] = []
        self.sent = 0
        self.failed = 0
        self.inflight: set[asyncio.Future[Any]] = set()
        # Sends that left for WAHA without a known answer yet: never RELEASED (the campaign service
        # clears the WAHA id on RELEASED); their lease expires and the next lease looks them up.
        self.maybe_sent: set[str] = set()
        # WAHA's 201 answers not yet turned into a SENT report (a send that finished after its lane
        # was cancelled); final() drops them, so this stays small however long the slice.
        self.send_ok: dict[str, dict[str, Any]] = {}
        # Chat ids WAHA's check-exists answered, by message id, until reported with ATTEMPTING.
        self.checked: dict[str, str] = {}
        self.last_check = 0.0  # monotonic time of the lane's last number check
        # Latest lease end of messages left leased on purpose: the lane must come back after it.
        self.revisit_at = 0.0
        # This slice left its own messages leased (an uncertain send): the next slice may retake them
        # as soon as our sends are over, not at their lease end (see LaneSlice._reclaim_own).
        self.left_own = False
        # A token of this slice alone (arq may re-run the same job id after a crash while the first
        # run is only paused): the lane hash's `owner`, checked by the fence on every request. The
        # pid says which worker process runs the lane (diagnostics, `make bench` takeover).
        self.lock = LaneLock(env.redis, campaign_id, chip_id, f"{job_id}/{os.getpid()}-{uuid.uuid4().hex[:12]}",
                             ttl_ms=int(self.cfg.lane_lock_ttl * 1000), queue=self.cfg.queue_name, batch=env.batch)
        self.lock_lost = False
        self.wake = asyncio.Event()  # set when the lock is lost: a sleeping lane stops at once
        self.starting = False  # counted in WorkerEnv.starting until its first lease
        self.lease_until = 0.0  # lease end written ahead into the lane hash (a takeover's revisit)
        self.reclaim: list[tuple[float, str]] = []  # (after, owner) of owners this lane took over
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
        self.run_value = f"{fences_mod.run_value(epoch)}#{self.lock.owner}"  # fence_ok: fence + owner
        # Full speed (no minimum gap): larger batches and reports, and an ended send's token waits
        # for the next reservation, which comes at once, to release it (the release marks the
        # chip's last send END; later is only more conservative): two Redis steps per message
        # instead of three. A paced send's token is released as soon as the send ends
        # (_release_at_once): its lane's next reservation rarely came within FOLD_RELEASE_SECONDS
        # under load, and a stop draining the campaign waited for it.
        self.fold_release = self.limits.interval_min <= 0
        # Bursts: every gap is 0 and nothing happens before a send (no seen/typing).
        self.burst = self.limits.interval_max <= 0 and not self.seen and not self.typing
        self.report_batch = (MAX_BATCH_BURST if self.burst else REPORT_BATCH_FAST) if self.fold_release \
            else REPORT_BATCH
        self.burst_stop = False
        # The batch being sent is the lane's last (nothing PENDING after it): its outcomes are
        # reported after every burst (one report at a time), so the campaign's completion waits
        # for a small report, not the ~400 outcomes of a whole batch (0.1-0.3 s at the end of the
        # `dispatch` figure); earlier batches keep reporting by the hundred (each report costs
        # the campaign service a transaction).
        self.last_batch = False
        # Sends registered per burst (bursts.py): what fitted the last bursts' BURST_SECONDS.
        self.burst_size = BURST_START
        self.unreleased: str | None = None
        self.release_timer: asyncio.TimerHandle | None = None
        # PENDING messages of the lane after the last lease: no more ids are taken than can be used.
        self.remaining_hint: int | None = None
        self.remaining_capped = False  # the count reached its cap: at least that many are left
        # The last lease left nothing behind for this lane: it was not full and nothing PENDING came
        # after it (`remaining` 0), and nothing left leased by an earlier slice could still expire
        # into it. A lane ends then without the confirming empty lease (loop._drained).
        self.drained = False
        # Lease end of messages an earlier slice left leased (the lane hash's `revisit_at`, read
        # at the slice's start): until it has passed a lease may still find them expired.
        self.lane_revisit_at = 0.0
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
                pace_chip=self.chip if min_gap is not None else None, min_gap=min_gap or 0.0,
                owner=(self.lane_key, self.lock.owner))
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
                elif pace_chip is not None:
                    self._release_at_once(tok)
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

    def _release_at_once(self, tok: str) -> None:
        """A send ended: its release leaves in this tick's batch without the lane waiting for it
        (a stop draining the campaign waits for it; the lane's own later steps are queued after)."""
        fut = self.env.fences.release_send_nowait(self.c, tok, self.chip)
        self.inflight.add(fut)  # the slice's cleanup waits for it like for a request
        fut.add_done_callback(self.inflight.discard)

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
        """Sleep, stopping early (Stopped) when the campaign's fence moves or the lane loses its
        lock, noticed within a second (fence_watch.py: one poll per campaign for all sleepers).

        No check after the full sleep: what follows is a fenced WAHA call (atomic check) or a loop
        that checks the fence itself, so a check here would only cost a round trip."""
        if seconds <= 0:
            return
        await self.release_now()
        if seconds <= FENCE_POLL_SECONDS:  # shorter than a poll: a plain timer (lanes at full speed or 1 s)
            await asyncio.sleep(seconds)
            moved = False
        else:
            moved = await self.env.fence_watch.sleep(self.c, self.epoch, seconds, self.wake)
        if self.lock_lost or moved:
            raise fences_mod.Stopped(self.c)
