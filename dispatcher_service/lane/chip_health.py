"""The lane's judgement of its chip: report a state change (WAHA 422: UNAVAILABLE, error 463:
RESTRICTED, back to ACTIVE) and wait, bounded by the slice, for the session to be WORKING again."""

from __future__ import annotations

import logging
import random
import time

from dispatcher_service.lane.reporting import ReportingLane
from dispatcher_service.waha.client import (
    WahaError,
)
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb

log = logging.getLogger("dispatcher.lane")


class ChipHealthLane(ReportingLane):
    """Chip state reports and the wait for a WORKING session."""

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
