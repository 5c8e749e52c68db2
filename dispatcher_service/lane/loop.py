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
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from dispatcher_service import fences as fences_mod
from dispatcher_service import metrics, tracing
from dispatcher_service.delivery import DeliveryUnavailable
from dispatcher_service.lane.common import (
    LANE_WAIT_MAX_SECONDS,
    LANE_WAIT_REPORT_SECONDS,
    CampaignNotRunning,
    ChipBanned,
    ChipDown,
    SliceOver,
    WorkerEnv,
    answer_id,
)
from dispatcher_service.lane.leasing import LeasingLane
from dispatcher_service.logs import lane_ctx
from dispatcher_service.store import aw
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb

log = logging.getLogger("dispatcher.lane")


# A taken-over owner's leases are retaken one WAHA timeout plus this after our lock fenced it.
RECLAIM_MARGIN_SECONDS = 2.0
MAX_RECLAIM_OWNERS = 8


def parse_reclaim(raw: str) -> list[tuple[float, str]]:
    """The lane hash's `reclaim`: "<after> <owner>" pairs, ';'-separated (owners are job ids)."""
    out: list[tuple[float, str]] = []
    for part in raw.split(";"):
        after, _, owner = part.strip().partition(" ")
        if owner:
            out.append((float(after), owner))
    return out


def format_reclaim(pairs: list[tuple[float, str]]) -> str:
    return ";".join(f"{after:.3f} {owner}" for after, owner in pairs)


def metrics_takeover(ctx: str, until: float) -> None:
    """Log a slice that took its lane over from an owner that died holding leases."""
    log.info("%s took the lane over; the dead owner's leases are retaken after %.1fs", ctx, until - time.time())


class Lane(LeasingLane):
    """One slice of one lane: lease -> send -> report until the slice, the work or the fence ends."""

    async def run(self) -> str:
        """Run the slice; always cleans up (releases unsent leases, unlocks, chains the next slice)."""
        outcome = "error"
        defer = 5.0
        cancelled = False
        locked = False
        try:
            self.env.starting += 1
            self.starting = True
            if not await self.env.fences.is_current(self.c, self.epoch):
                outcome = "stopped"
                return outcome
            if not await self.lock.acquire():
                log.info("%s lane busy (another slice holds it); asked it to follow up", self.ctx)
                outcome = "busy"
                return outcome
            locked = True
            self.env.beats.add(self.lock, self._lock_lost)  # the worker's heartbeat keeps it from now on
            await self._took_over()
            await self.env.store.set_lane(self.c, self.chip, state=pb.LANE_STATE_RUNNING, epoch=self.epoch,
                                          job=self.job_id, queued="")
            log.info("%s slice start job=%s", self.ctx, self.job_id)
            with metrics.LANES.track_inprogress():
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
            self._started()
            metrics.slice_ended(outcome)
            try:  # the heartbeat goes on while the slice cleans up (reports can take seconds)
                await asyncio.shield(self._cleanup(outcome, defer, cancelled, locked))
            finally:
                self.env.beats.remove(self.lock)

    async def _took_over(self) -> None:
        """A lane whose last owner died holding leases (its `lease_until` is left: a clean unlock
        clears it) was just fenced by our lock: whatever that owner let leave reached WAHA or
        failed within one WAHA timeout from now. After that its leased messages are retaken
        (LeaseMessages.reclaim_owners) and looked up by their recorded ids before any resend,
        rather than waiting for its leases to end. Owners taken over earlier stay listed in the
        lane hash (`reclaim`) for the slices that follow."""
        lane = await self.env.store.lane_hash(self.c, self.chip)
        self.reclaim = parse_reclaim(lane.get("reclaim", ""))
        self.lane_revisit_at = float(lane.get("revisit_at") or 0)
        until = float(lane.get("lease_until") or 0)
        prev = lane.get("lease_owner", "")
        now = time.time()
        if until <= now:
            return
        if prev and prev != self.job_id and all(o != prev for _, o in self.reclaim):
            after = now + self.cfg.waha_timeout + RECLAIM_MARGIN_SECONDS
            self.reclaim = [*self.reclaim, (after, prev)][-MAX_RECLAIM_OWNERS:]
            await aw(self.env.redis.hset(self.lane_key, "reclaim", format_reclaim(self.reclaim)))
            until = min(until, after)
        self.revisit_at = max(self.revisit_at, until)
        metrics_takeover(self.ctx, until)

    async def _still_owner(self) -> bool:
        """Did no other slice take the lane over? The lane hash names our lock as its owner, or no
        owner at all (the dispatch was stopped and its state dropped: nobody can hold our messages
        then). When Redis cannot tell, no: leaving leases to expire is always safe."""
        try:
            owner = await aw(self.env.redis.hget(self.lane_key, "owner"))
        except RedisError:
            return False
        return owner is None or (owner.decode() if isinstance(owner, bytes) else owner) == self.lock.owner

    async def _reclaim_own(self) -> None:
        """This slice ends leaving uncertain sends leased: list its own job id in the lane hash's
        `reclaim`, so the next slice retakes them (and looks each up by its recorded id) once
        whatever left is over — one WAHA timeout after now, as for a takeover — not at their lease
        end (the lane's next visit, the hash's `revisit_at`, stays for anything else)."""
        after = time.time() + self.cfg.waha_timeout + RECLAIM_MARGIN_SECONDS
        self.reclaim = [*(p for p in self.reclaim if p[1] != self.job_id), (after, self.job_id)][-MAX_RECLAIM_OWNERS:]
        await aw(self.env.redis.hset(self.lane_key, "reclaim", format_reclaim(self.reclaim)))

    def _lock_lost(self) -> None:
        """The heartbeat found the lock not ours any more (taken over while we were paused or cut
        off): nothing of ours may leave."""
        log.warning("%s lane lock lost; stopping sends", self.ctx)
        self.lock_lost = True
        self.wake.set()

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
                    if self._drained():
                        return "finished", 0.0
                    if not await self.env.fences.is_current(self.c, self.epoch):
                        return "stopped", 0.0
                    self._check_slot_in_slice()
                    p = await self._prepare(*self._batch(most=self._first_batch()))
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
                self.last_batch = resp.remaining == 0
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

    def _drained(self) -> bool:
        """The lane's work is done without asking again: its last lease came back short of its
        batch with `remaining` 0 (every expired lease and PENDING message of the lane was in it),
        all of it is reported, nothing was released back to PENDING since (a chip back from
        UNAVAILABLE goes on in the same slice), nothing is left leased or taken over, and leases
        left by earlier slices had ended before it. The empty lease that used to confirm this was
        one of the ~5 transactions of a short lane's life (10,000 lanes ending together in
        `make bench`). Messages a failover moves onto the chip later wake the lane
        (ensure_campaign: a lane still holding its lock is asked to follow up); the watchdog
        covers a sweep's."""
        return (self.drained and not self.held and not self.maybe_sent and not self.left_own
                and not self.reclaim and self.pending_flush is None)

    async def _release_held(self, reason: str) -> None:
        """Hand back what was not sent. A send that got its 201 after all is SENT; one whose answer
        is unknown is left leased (its recorded WAHA id is looked up when the lease is retaken).
        A slice whose lane was taken over releases nothing: the new owner may have retaken those
        messages already, and a RELEASED would put them back to PENDING under its feet."""
        await self._settle_prefetch()  # a prefetched batch is held too: released with the rest
        await self.release_now()
        mine = await self._still_owner()
        for m in list(self.held.values()):
            ok = self.send_ok.get(m.message_id)
            if ok is not None:
                self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=answer_id(ok) or m.waha_message_id)
            elif m.message_id in self.maybe_sent or not mine:
                log.info("%s message=%s %s: left leased for a lookup on the next lease", self.ctx, m.message_id,
                         "outcome uncertain" if mine else "lane taken over")
                self._leave_leased(m, own=mine)
            else:
                self.final(m, dpb.DELIVERY_OUTCOME_RELEASED, reason=reason)
        try:
            await self.flush(check=False)
        except DeliveryUnavailable as e:
            log.warning("%s release report failed (leases will expire): %s", self.ctx, e)

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
            mine = (not lane.get("epoch") or int(lane["epoch"]) <= self.epoch) and not self.lock_lost
            if locked and mine:
                fields: dict[str, str | int | float] = {"state": state}
                if self.last_error:
                    fields["last_error"] = self.last_error
                await store.set_lane(self.c, self.chip, **fields)
            self.env.beats.remove(self.lock)
            wanted = await self.lock.release() if locked else False
            if wanted:  # a slice (maybe of a newer epoch) found us busy: make sure the lane goes on
                jid = await store.ensure_lane(self.c, self.chip)
                log.info("%s lane was wanted meanwhile; follow-up job %s", self.ctx, jid)
            if cancelled:
                return  # arq re-runs this very job (shutdown) or it was aborted by a stop
            await store.job_done(self.c, self.job_id)
            if not current or outcome in ("stopped", "chip_failed") or self.lock_lost:
                return  # (lock lost: the lane's new owner goes on)
            # Messages left leased (uncertain outcome) by this or an earlier slice: come back when
            # their lease expired so they are looked up, or the campaign would never complete.
            revisit = max(self.revisit_at, float(lane.get("revisit_at") or 0))
            if revisit > float(lane.get("revisit_at") or 0):
                await store.set_lane(self.c, self.chip, revisit_at=revisit)
            if self.left_own and locked and mine:
                await self._reclaim_own()
            soon = [after for after, _ in self.reclaim if after > time.time()]
            if soon and revisit > time.time():  # leases retakeable before they end: come back then
                revisit = min(revisit, min(soon))
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
    metrics.job_started(int(ctx.get("job_try") or 1))
    job_id = str(ctx.get("job_id") or f"lane:{campaign_id}:{chip_id}:{epoch}:{n}")
    got = await env.store.load_lane_spec(campaign_id, chip_id)  # shared, parsed once per worker
    if got is None:
        log.info("%s no dispatch state; nothing to do", lane_ctx(campaign_id, chip_id, epoch))
        await env.store.job_done(campaign_id, job_id)
        return "gone"
    req, spec = got
    lane = Lane(env, campaign_id, chip_id, epoch, job_id, spec, req.camouflage)
    with tracing.slice_span(campaign_id, chip_id, epoch, job_id):
        return await lane.run()
