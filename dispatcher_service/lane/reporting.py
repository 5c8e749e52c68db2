"""A lane's outcome reports: buffered, flushed to DeliveryService in batches (in the background
while sending at full speed), and the messages the lane still holds."""

from __future__ import annotations

import asyncio
import logging
import time

from dispatcher_service import metrics
from dispatcher_service.lane.common import (
    CampaignNotRunning,
    now_report,
    ts_seconds,
)
from dispatcher_service.lane.fenced import FencedLane
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as rpb

log = logging.getLogger("dispatcher.lane")


class ReportingLane(FencedLane):
    """Outcome reports of the messages a slice holds."""

    def final(self, m: dpb.LeasedMessage, outcome: int, waha_id: str = "", reason: str = "",
              checked: tuple[bool, str] | None = None) -> None:
        r = now_report()
        r.message_id = m.message_id
        r.outcome = outcome  # type: ignore[assignment]
        if waha_id:  # proto3: an unset string is "" (one field set less per message)
            r.waha_message_id = waha_id
        if reason:
            r.failure_reason = reason
        if checked is not None:
            r.number_checked, (r.number_exists, r.checked_chat_id) = True, checked
        self.reports.append(r)
        self.held.pop(m.message_id, None)
        self.maybe_sent.discard(m.message_id)
        self.send_ok.pop(m.message_id, None)  # an answer is kept only until its outcome is reported
        metrics.message_outcome(outcome, reason)
        if outcome == dpb.DELIVERY_OUTCOME_SENT:
            self.sent += 1
        elif outcome == dpb.DELIVERY_OUTCOME_RELEASED:
            self.drained = False  # PENDING in the lane again: only a lease tells what is left
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
        """ATTEMPTING (the id recorded before the send), with the number check's answer if one was made."""
        r = now_report()
        r.message_id = m.message_id
        r.outcome = dpb.DELIVERY_OUTCOME_ATTEMPTING
        r.waha_message_id = waha_id
        chat = self.checked.pop(m.message_id, None)
        if chat is not None:
            r.number_checked = r.number_exists = True
            r.checked_chat_id = chat
        return r

    def _leave_leased(self, m: dpb.LeasedMessage, own: bool = True) -> None:
        """Keep the lease (and the WAHA id recorded with it) and come back once it expired, or
        sooner when it is `own` (this slice's uncertain send, not a lane taken over under us)."""
        self.held.pop(m.message_id, None)
        self.left_own = self.left_own or own
        end = ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else time.time() + 60
        self.revisit_at = max(self.revisit_at, end)
