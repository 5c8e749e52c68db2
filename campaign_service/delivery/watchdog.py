"""The watchdog of guarantee 3: a RUNNING campaign whose lanes went silent with work left gets a new
dispatch epoch and StartDispatch again (the scheduler's tick finds the candidates; see scheduler.py
for what counts as silent). Old lanes are fenced by the epoch."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import text

from campaign_service import audit, convert, pacing
from campaign_service.db.engine import Database
from campaign_service.delivery import chips, transitions
from campaign_service.delivery.common import (
    CHIP_RESTRICTED,
    PENDING,
    RUNNING,
    SENDING,
    is_lock_timeout,
    set_lock_timeout,
)
from campaign_service.dispatch import DispatcherClient, lane_for
from campaign_service.repository import chips as chips_repo
from campaign_service.repository import messages as messages_repo
from campaign_service.secrets_box import SecretBox
from whago.campaign.v1 import resources_pb2 as res

log = logging.getLogger("campaign_service.scheduler")

# The watchdog: RUNNING campaigns quiet for `stall` (no change, no lane seen or due back) a page at
# a time (campaigns and delivery_lanes only), then one probe of their messages per candidate with
# its id as a literal, as for the completion sweep: as correlated subqueries of one statement,
# statistics taken while one big campaign ran with every message PENDING planned the open-work
# check as a hash over a seq scan of campaign_messages, every tick (measured: 54 ms a tick at 450k
# rows, 335 ms at 2.25M; 14-27 ms as probes).
_QUIET = f"""
c.state = {RUNNING:d}
AND c.updated_at < now() - make_interval(secs => :stall)
AND NOT EXISTS (SELECT 1 FROM delivery_lanes l WHERE l.campaign_id = c.id
                AND greatest(l.last_seen_at, CASE WHEN l.resume_epoch = c.dispatch_epoch THEN l.resume_at END)
                    > now() - make_interval(secs => :stall))"""
QUIET_PAGE = text(f"SELECT c.id FROM campaigns c WHERE {_QUIET} AND c.id > :after ORDER BY c.id LIMIT :n")
# No live lease (a working lane holds one) and work left: PENDING, or a lease that expired.
_STALLED_WORK = f"""
NOT EXISTS (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid AND state = {SENDING:d}
            AND lease_expires_at >= now())
AND (EXISTS (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid AND state = {PENDING:d})
     OR EXISTS (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid AND state = {SENDING:d}
                AND lease_expires_at < now()))"""
HAS_STALLED_WORK = text(f"SELECT {_STALLED_WORK}")
_LOCK_STALLED = text(f"""
SELECT c.id, c.user_id, c.settings FROM campaigns c WHERE c.id = :cid AND {_QUIET} AND {_STALLED_WORK}
FOR UPDATE SKIP LOCKED""")

WINDOW_RECHECK_SECONDS = 60.0


@dataclass(frozen=True)
class Restart:
    """What restart_if_stalled did: the new epoch when it restarted the dispatch; `recheck`, the
    seconds after which to look again when every lane waits on a sending window."""

    epoch: int | None = None
    recheck: float | None = None


def restart_if_stalled(db: Database, cid: uuid.UUID, stall: float, tried: dict[uuid.UUID, int],
                       dispatcher: DispatcherClient, box: SecretBox) -> Restart:
    """New epoch + StartDispatch, holding the campaign row FOR UPDATE so leases wait for the commit
    and see the new epoch; a dispatcher failure rolls the epoch back. Nothing when the campaign is
    not stalled after all (re-checked under the lock) or is locked. `tried`: the epoch last tried per
    campaign, kept by the caller: one the dispatcher refused (it had fenced it already) is not tried
    again, the next restart goes above it."""
    try:
        with db.transaction() as s:
            set_lock_timeout(s)
            c = s.execute(_LOCK_STALLED, {"cid": str(cid), "stall": stall}).one_or_none()
            if c is None:
                return Restart()
            chip_ids = messages_repo.open_chip_ids(s, cid)
            usable = [ch for ch in chips_repo.by_ids(s, c.user_id, chip_ids) if ch.state != CHIP_RESTRICTED]
            if not usable:
                transitions.auto_pause(s, cid, chips.NO_CHIP_LEFT, "campaign.auto_pause")
                return Restart()
            settings = convert.settings_from_json(c.settings)
            lanes = [lane_for(ch, settings.pacing, box) for ch in usable]
            recheck = window_recheck([ln.pacing for ln in lanes], stall, time.time())
            if recheck is not None:
                return Restart(recheck=recheck)
            epoch = s.execute(text(
                "UPDATE campaigns SET dispatch_epoch = greatest(dispatch_epoch + 1, :floor) WHERE id = :cid "
                "RETURNING dispatch_epoch"), {"cid": str(cid), "floor": tried.get(cid, 0) + 1}).scalar_one()
            s.execute(text("""
                INSERT INTO delivery_lanes (campaign_id, chip_id, last_seen_at, lease_seconds, lease_owner)
                SELECT :cid, chip, now(), 0, 'watchdog' FROM unnest(CAST(:chips AS uuid[])) AS chip
                ON CONFLICT (campaign_id, chip_id) DO UPDATE
                SET last_seen_at = now(), lease_seconds = 0, lease_owner = 'watchdog', resume_at = NULL,
                    resume_epoch = NULL"""),
                {"cid": str(cid), "chips": [str(ch.id) for ch in usable]})
            audit.record(s, user_id=c.user_id, action="campaign.dispatch_restart", entity_type="campaign",
                         entity_id=str(cid), description="watchdog: lanes silent with work left, dispatch "
                         "restarted", extra_data={"epoch": epoch, "chips": [str(ch.id) for ch in usable]},
                         actor=audit.WATCHDOG)
            tried[cid] = epoch
            dispatcher.start(str(cid), epoch, lanes, pacing.effective_camouflage(settings.camouflage))
            log.warning("campaign=%s watchdog: lanes silent for %.0fs with work left, dispatch restarted "
                        "at epoch %d over %d chips", cid, stall, epoch, len(usable))
            return Restart(epoch=epoch)
    except Exception as exc:
        if is_lock_timeout(exc):
            return Restart()
        raise


def window_recheck(lane_pacing: list[res.Pacing], stall: float, now: float) -> float | None:
    """None when some lane could have sent for the whole stall period (no sending window, or one
    open for at least `stall` seconds): its silence means the dispatch stalled. Otherwise every lane
    waits on a closed or just-opened window, which is silence by design (a lane defers its job to
    the window's opening); the seconds after which to look again are returned."""
    wait = WINDOW_RECHECK_SECONDS
    for p in lane_pacing:
        if not p.HasField("window"):
            return None
        since = pacing.window_open_since(p.window, now)
        if since is None:
            continue
        if now - since >= stall:
            return None
        wait = min(wait, since + stall - now)
    return max(1.0, wait)
