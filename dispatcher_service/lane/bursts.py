"""Full speed (every gap 0, no camouflage): text messages sent in bursts, each burst under one fence
token taken together with its pacing (caps, window) in one atomic step."""

from __future__ import annotations

import asyncio
import logging
import time

from dispatcher_service import fences as fences_mod
from dispatcher_service import metrics
from dispatcher_service.lane.common import (
    BURST,
    BURST_SECONDS,
    ChipBanned,
    ChipDown,
    SliceOver,
    ts_seconds,
)
from dispatcher_service.lane.sending import SendingLane
from dispatcher_service.waha.client import (
    ChipRestricted,
    MessageRejected,
    SessionNotWorking,
    WahaError,
    WahaServerError,
    WahaTimeout,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb

log = logging.getLogger("dispatcher.lane")


def next_burst_size(registered: int, used: int) -> int:
    """The next burst's registrations after one that used `used` of `registered`: a little more
    when all fitted in BURST_SECONDS, a little less than what fitted when time ran out (so most
    bursts end by count, with nothing to give back)."""
    if used >= registered:
        return min(BURST, registered + max(1, registered // 2))
    return max(1, used - max(1, used // 8))


class BurstingLane(SendingLane):
    """Bursts of sends for lanes at full speed."""

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
                    self.cfg.waha_timeout + BURST_SECONDS + 2, min(self.burst_size, len(todo) - i), prev_token=prev)
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
                metrics.pacing_wait(got - time.time())
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
            if failure is None and not self.burst_stop:
                self.burst_size = next_burst_size(n, done)
            # warm-up: the registered sends that never left stop counting (SliceOver: not sent)
            await self.env.pacer.return_burst(self.chip, self.limits, token, done + (
                0 if failure is None or isinstance(failure, SliceOver) else 1), n)
            if len(self.reports) >= self.report_batch or self.last_batch:
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
                lease_end = ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else time.time() + 60
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
