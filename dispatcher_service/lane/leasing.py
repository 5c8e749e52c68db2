"""A lane's leases: the batch sizes, the lease itself (message ids chosen first and recorded by it),
and the next batch prefetched while the current one is sent."""

from __future__ import annotations

import asyncio
import logging
import time

from dispatcher_service.lane.bursts import BurstingLane
from dispatcher_service.lane.common import (
    ID_CHUNK,
    ID_CHUNK_BURST,
    MAX_BATCH,
    MAX_BATCH_BURST,
    PREFETCH_AHEAD_SECONDS,
    PREFETCH_AHEAD_SECONDS_BURST,
    REMAINING_COUNTED,
    CampaignNotRunning,
    Prepared,
    SliceOver,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as rpb

log = logging.getLogger("dispatcher.lane")

# Leases an earlier slice left behind count as ended this long after the lane hash's `revisit_at`.
REVISIT_MARGIN_SECONDS = 5.0


class LeasingLane(BurstingLane):
    """Leases batches for the slice (loop.Lane) and prefetches the next one."""

    def _reclaim_owners(self) -> list[str]:
        """Taken-over owners whose sends are all over by now (see _took_over)."""
        now = time.time()
        return [o for after, o in self.reclaim if after <= now]

    def _started(self) -> None:
        """The slice's start (lock, lane state, first lease) is over: the worker may claim another job."""
        if self.starting:
            self.starting = False
            self.env.starting -= 1

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
        hint = self.remaining_hint
        if hint is not None and self.cfg.message_ids != "local":
            n = max(1, min(n, hint))  # WAHA's ids cost a request each: no more than can be used
        k = 0 if self.cfg.check_exists else n if hint is None or self.remaining_capped else min(n, hint)
        # Written ahead of the lease: should this slice die holding it, a takeover knows until when.
        asked = time.time()
        until = asked + lease_s + 2.0
        if until > self.lease_until:
            self.lease_until = until
            await self.env.store.cmd("HSET", self.lane_key, "lease_until", f"{until:.3f}", "lease_owner", self.job_id)
        ids = await self._new_ids(k) if k > 0 else []
        resp = await self.env.leases.lease(dpb.LeaseMessagesRequest(
            campaign_id=self.c, chip_id=self.chip, epoch=self.epoch, max_messages=n, lease_seconds=lease_s,
            lease_owner=self.job_id, waha_message_ids=ids, reclaim_owners=self._reclaim_owners()))
        self._started()
        for m in resp.messages:
            self.held[m.message_id] = m
        if resp.campaign_state != rpb.CAMPAIGN_STATE_RUNNING or resp.epoch != self.epoch:
            raise CampaignNotRunning(resp.campaign_state)
        # `remaining` is counted up to max(n, REMAINING_COUNTED) (delivery_service.proto): at the cap
        # it means "at least that many", no bound on the next batch's local ids (they would otherwise
        # run short: a 400-batch after a count capped at 200 sent half its messages the careful way).
        self.remaining_hint = resp.remaining
        # (REVISIT_MARGIN_SECONDS: the campaign service's clock may run behind ours.)
        self.drained = (resp.remaining == 0 and len(resp.messages) < n
                        and self.lane_revisit_at + REVISIT_MARGIN_SECONDS < asked)
        self.remaining_capped = resp.remaining >= max(n, REMAINING_COUNTED)
        msgs = list(resp.messages)
        if msgs and all(m.attempt_waha_message_id and not (m.verify_number or m.not_on_whatsapp) for m in msgs):
            return Prepared(resp, [(m, m.attempt_waha_message_id) for m in msgs])
        return Prepared(resp)

    def _check_slot_in_slice(self) -> None:
        """SliceOver, before leasing, when the chip's pace allows no send of ours before this slice
        ends: a lease taken now would only be released at its first reservation (one LeaseMessages
        and one ReportDeliveries for nothing, per slice of every paced lane)."""
        if self.next_send_min <= 0 or self.fold_release:
            return
        now = time.time()
        slice_end = now + (self.deadline - time.monotonic())
        if self.next_send_min > slice_end:
            lead = self._lead(self.typing_max if self.typing else 0.0)  # the longest the next message may need
            raise SliceOver(max(0.0, self.next_send_min - lead - now - 2.0), "next slot is beyond this slice")

    def _first_batch(self) -> int:
        """A batch leased without one prefetched: small, so the first sends leave early. A bursting
        lane takes ID_CHUNK_BURST: its sends (~2 ms each on the `dispatch` figure) then outlast the
        next lease (~20-40 ms while every lane of a campaign leases at once); 10 left each lane
        waiting ~40 ms for its second batch."""
        if self.burst:
            return ID_CHUNK_BURST
        return ID_CHUNK if self.fold_release else MAX_BATCH

    def _start_prefetch(self, sending: int) -> None:
        """Prepare the next batch while `sending` messages go out, when they go out soon enough and
        the last lease did not drain the lane (nothing would come of it: see loop._drained)."""
        if self.drained:
            return
        per_msg = self._per_msg()
        ahead = sending * per_msg
        most = PREFETCH_AHEAD_SECONDS_BURST if self.burst else PREFETCH_AHEAD_SECONDS
        # The next batch's first send comes one more gap after the current batch: past the slice's
        # end, that batch would be leased only to be released.
        if ahead > most or time.monotonic() + ahead + max(1.0, per_msg) >= self.deadline:
            return
        # Growing batches: the first ones are small so the first sends leave early. A bursting lane
        # grows them 4x (25, 100, 400): each lease and report is a transaction with a fixed cost
        # (lease + report of 200 cost ~13% more per message than of 400, measured in-process), which
        # the ramp's small batches pay most.
        grow = 4 if self.burst else 2
        self.prefetch = asyncio.ensure_future(self._prepare(*self._batch(ahead, max(ID_CHUNK, grow * sending))))

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
