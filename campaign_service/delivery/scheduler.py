"""Background jobs of campaign_service: one stoppable thread, a tick about every second, bounded
work per tick, safe with several replicas on one PostgreSQL and tolerant to database outages.

Each tick, in order:
1. `start_due`: SCHEDULED campaigns whose schedule_time has passed are started through the same
   operation as StartCampaign (`CampaignLifecycle.start_scheduled`). Candidates are picked
   `FOR UPDATE SKIP LOCKED` so replicas spread them; Start itself re-checks under its row lock. A
   refused start (no contacts, no chip, credits) stays SCHEDULED with the error in state_reason and
   is retried after `RETRY_REFUSED_SECONDS`.
2. `sweep_unusable_chips`: PENDING messages of RUNNING campaigns that sit on a chip out of rotation
   (e.g. released by its lane after ReportChipState moved the rest) are redistributed, or the
   campaign is auto-paused when no ACTIVE chip is left. Expired, never-attempted leases on such
   chips go back to PENDING first.
3. `complete_finished`: RUNNING campaigns whose messages are all final become COMPLETED (covers a
   lost last report).
4. `kick_stalled`, the watchdog of guarantee 3: a RUNNING campaign with work left (PENDING or an
   expired lease), no live lease (a working lane always holds one: it leases a batch and sends it),
   no lane that leased within `stall_seconds` (WHAGO_WATCHDOG_STALL_SECONDS, default 120), and no
   (re)start within that time either, gets a new dispatch epoch and StartDispatch again. Old lanes
   are fenced by the epoch. A lane that deliberately waits longer than that without a lease is left
   alone: one held back by a cap or a closed window reports until when (ReportLaneWait,
   `lane_waits.py`), and is silent by design until then plus `stall_seconds`; lanes whose sending
   window is closed (or opened less than `stall_seconds` ago) are also recognised from their pacing.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from campaign_service import audit, convert, errors, metrics, pacing
from campaign_service.background import BackgroundLoop
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.delivery import chips, transitions
from campaign_service.delivery.common import (
    CHIP_ACTIVE,
    CHIP_RESTRICTED,
    PENDING,
    RUNNING,
    SCHEDULED,
    SENDING,
    is_lock_timeout,
    set_lock_timeout,
)
from campaign_service.dispatch import DispatcherClient, Lane, lane_for
from campaign_service.ops.campaign_lifecycle import CampaignLifecycle
from campaign_service.repository import chips as chips_repo
from campaign_service.repository import messages as messages_repo
from campaign_service.secrets_box import SecretBox
from whago.campaign.v1 import resources_pb2 as res

log = logging.getLogger("campaign_service.scheduler")

RETRY_REFUSED_SECONDS = 60.0
RETRY_UNAVAILABLE_SECONDS = 5.0


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class SchedulerConfig:
    tick_seconds: float = field(default_factory=lambda: _env_float("WHAGO_SCHEDULER_TICK_SECONDS", 1.0))
    stall_seconds: float = field(default_factory=lambda: _env_float("WHAGO_WATCHDOG_STALL_SECONDS", 120.0))
    batch: int = field(default_factory=lambda: int(_env_float("WHAGO_SCHEDULER_BATCH", 20)))


@dataclass
class TickResult:
    started: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    kicked: list[str] = field(default_factory=list)
    errors: int = 0


_DUE = text(f"""
SELECT id FROM campaigns WHERE state = {SCHEDULED:d} AND schedule_time <= now()
ORDER BY schedule_time LIMIT :n FOR UPDATE SKIP LOCKED""")

# The completion sweep: RUNNING campaigns a page at a time (ix_campaigns_running), then one probe
# per campaign with its id as a literal. As one statement (NOT EXISTS over a join, or per-row
# SubPlans), the planner priced the probe from campaign_messages' statistics for a parameter; taken
# when one campaign was running with every message PENDING, they made it seq-scan campaign_messages
# (or walk its primary key) once per running campaign: 0.6-9.9 s per tick in `make bench` cancel
# (50 running campaigns, 280k rows), 43 s of PostgreSQL's CPU in an 87 s figure. With a literal id
# the estimate is that campaign's own, and the campaign index is the cheap way to answer it.
_RUNNING_PAGE = text(f"SELECT id FROM campaigns WHERE state = {RUNNING:d} AND id > :after ORDER BY id LIMIT :n")
_HAS_OPEN = text(f"SELECT EXISTS (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid"
                 f" AND state IN ({PENDING:d}, {SENDING:d}))")
# Running campaigns probed per tick (the sweep is a safety net: a lost last report, a drifted counter).
FINISHED_PROBES_PER_TICK = 200
_FIRST_ID = uuid.UUID(int=0)

_UNUSABLE = text(f"""
SELECT c.id AS cid, c.state, ch.id AS chip FROM campaigns c
JOIN chips ch ON ch.user_id = c.user_id AND ch.state <> {CHIP_ACTIVE:d}
WHERE c.state = {RUNNING:d}
  AND EXISTS (SELECT 1 FROM campaign_messages m WHERE m.campaign_id = c.id AND m.chip_id = ch.id
              AND (m.state = {PENDING:d}
                   OR (m.state = {SENDING:d} AND m.lease_expires_at < now() AND m.waha_message_id IS NULL)))
LIMIT :n""")

# Never attempted (no waha id) and the lease is gone: safe to send from another chip.
_UNLEASE = text(f"""
WITH old AS (
    SELECT id, state FROM campaign_messages
    WHERE campaign_id = :cid AND chip_id = :chip AND state = {SENDING:d} AND lease_expires_at < now()
      AND waha_message_id IS NULL
    FOR UPDATE SKIP LOCKED
)
UPDATE campaign_messages m SET state = {PENDING:d}, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM old WHERE m.id = old.id RETURNING m.id""")

_STALL_PREDICATE = f"""
c.state = {RUNNING:d}
AND c.updated_at < now() - make_interval(secs => :stall)
AND NOT EXISTS (SELECT 1 FROM delivery_lanes l WHERE l.campaign_id = c.id
                AND greatest(l.last_seen_at, CASE WHEN l.resume_epoch = c.dispatch_epoch THEN l.resume_at END)
                    > now() - make_interval(secs => :stall))
AND NOT EXISTS (SELECT 1 FROM campaign_messages m WHERE m.campaign_id = c.id AND m.state = {SENDING:d}
                AND m.lease_expires_at >= now())
AND EXISTS (SELECT 1 FROM campaign_messages m WHERE m.campaign_id = c.id
            AND (m.state = {PENDING:d} OR (m.state = {SENDING:d} AND m.lease_expires_at < now())))
"""

_STALLED = text(f"SELECT c.id FROM campaigns c WHERE {_STALL_PREDICATE} ORDER BY c.updated_at LIMIT :n")
_LOCK_STALLED = text(f"""
SELECT c.id, c.user_id, c.settings FROM campaigns c WHERE c.id = :cid AND {_STALL_PREDICATE}
FOR UPDATE SKIP LOCKED""")


class Scheduler(BackgroundLoop):
    """The background thread; `run_once()` does one tick synchronously (tests use it)."""

    name = "campaign-scheduler"

    def __init__(self, db: Database, settings: Settings,
                 config: SchedulerConfig | None = None, ops: Any = None, dispatcher: Any = None) -> None:
        self.config = config or SchedulerConfig()
        super().__init__(self.config.tick_seconds)
        self.db = db
        self.settings = settings
        self._dispatcher = dispatcher
        self._own_dispatcher = False
        self._ops = ops
        self._retry_at: dict[uuid.UUID, float] = {}
        self._kicked_epoch: dict[uuid.UUID, int] = {}
        self._finished_after = _FIRST_ID  # the completion sweep's place among RUNNING campaigns

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            self._dispatcher = DispatcherClient(self.settings.dispatcher_target, self.settings.service_token,
                                                self.settings.dispatcher_timeout)
            self._own_dispatcher = True
        return self._dispatcher

    @property
    def ops(self) -> Any:
        """The CampaignService operations (Start), created on first use (tests give their own)."""
        if self._ops is None:
            self._ops = CampaignLifecycle(self.db, self.settings, self.dispatcher)
        return self._ops

    def start(self) -> Scheduler:
        super().start()
        log.info("scheduler started: tick %.1fs, stall %.0fs, batch %d", self.config.tick_seconds,
                 self.config.stall_seconds, self.config.batch)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the current job; safe to call twice."""
        super().stop(timeout)
        if self._own_dispatcher and self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None

    def tick(self) -> bool:
        """One tick; a failure (backing off) when every job failed: the database is down."""
        result = self.run_once()
        metrics.scheduler_tick(result.started, result.swept, result.completed, result.kicked)
        return result.errors < 4

    def run_once(self) -> TickResult:
        out = TickResult()
        for job, bucket in ((self.start_due, out.started), (self.sweep_unusable_chips, out.swept),
                            (self.complete_finished, out.completed), (self.kick_stalled, out.kicked)):
            if self.stopping:
                break
            try:
                bucket += job()
            except Exception as exc:
                out.errors += 1
                if self.failures == 0:
                    log.warning("scheduler job %s failed: %s", job.__name__, exc, exc_info=not _is_db_down(exc))
        return out

    def _due(self, cid: uuid.UUID) -> bool:
        return self._retry_at.get(cid, 0.0) <= time.monotonic()

    def _later(self, cid: uuid.UUID, seconds: float) -> None:
        if len(self._retry_at) > 10_000:
            now = time.monotonic()
            self._retry_at = {k: v for k, v in self._retry_at.items() if v > now}
        self._retry_at[cid] = time.monotonic() + seconds

    # -- 1. scheduled starts ------------------------------------------------------------------

    def start_due(self) -> list[str]:
        with self.db.transaction() as s:
            due = [r.id for r in s.execute(_DUE, {"n": self.config.batch})]
        started: list[str] = []
        for cid in due:
            if self.stopping or not self._due(cid):
                continue
            try:
                c = self.ops.start_scheduled(cid)
            except errors.FailedPrecondition as exc:
                log.warning("campaign=%s scheduled start refused: %s", cid, exc.message)
                self._note_refusal(cid, exc.message)
                self._later(cid, RETRY_REFUSED_SECONDS)
                continue
            except errors.Unavailable as exc:
                log.warning("campaign=%s scheduled start postponed: %s", cid, exc.message)
                self._later(cid, RETRY_UNAVAILABLE_SECONDS)
                continue
            except errors.ServiceError as exc:
                log.warning("campaign=%s scheduled start failed: %s", cid, exc.message)
                self._later(cid, RETRY_REFUSED_SECONDS)
                continue
            if c is not None:
                log.info("campaign=%s scheduled start done", cid)
                started.append(str(cid))
        return started

    def _note_refusal(self, cid: uuid.UUID, message: str) -> None:
        reason = f"scheduled start failed: {message}"
        with self.db.transaction() as s:
            s.execute(text(f"UPDATE campaigns SET state_reason = :r WHERE id = :cid AND state = {SCHEDULED:d} "
                           "AND state_reason <> :r"), {"r": reason, "cid": str(cid)})

    # -- 2. chips out of rotation ---------------------------------------------------------------

    def sweep_unusable_chips(self) -> list[str]:
        with self.db.session() as s:
            pairs = [(r.cid, r.chip) for r in s.execute(_UNUSABLE, {"n": self.config.batch})]
        swept: list[str] = []
        for cid, chip in pairs:
            try:
                with self.db.transaction() as s:
                    set_lock_timeout(s)
                    camp = s.execute(text("SELECT state FROM campaigns WHERE id = :cid FOR NO KEY UPDATE"),
                                     {"cid": str(cid)}).one_or_none()
                    if camp is None or camp.state != RUNNING:
                        continue
                    back = len(s.execute(_UNLEASE, {"cid": str(cid), "chip": str(chip)}).all())
                    done = chips.redistribute(s, cid, chip, camp.state, "chip out of rotation (sweep)")
            except Exception as exc:
                if not is_lock_timeout(exc):
                    raise
                continue
            if back or done:
                log.info("campaign=%s chip %s swept: %d expired leases back, %s", cid, chip, back, done or "-")
                swept.append(str(cid))
        return swept

    # -- 3. completion --------------------------------------------------------------------------

    def complete_finished(self) -> list[str]:
        """RUNNING campaigns with no open message left become COMPLETED (re-checked under the row
        lock by transitions.complete_if_done); FINISHED_PROBES_PER_TICK of them per tick, in id order
        from where the last tick stopped."""
        with self.db.session() as s:
            page = [r.id for r in s.execute(_RUNNING_PAGE, {"after": self._finished_after,
                                                            "n": FINISHED_PROBES_PER_TICK})]
            self._finished_after = page[-1] if len(page) == FINISHED_PROBES_PER_TICK else _FIRST_ID
            ids = [cid for cid in page if not s.execute(_HAS_OPEN, {"cid": cid}).scalar_one()][:self.config.batch]
        done: list[str] = []
        for cid in ids:
            try:
                with self.db.transaction() as s:
                    set_lock_timeout(s)
                    ev = transitions.complete_if_done(s, cid)
            except Exception as exc:
                if not is_lock_timeout(exc):
                    raise
                continue
            if ev is not None:
                done.append(str(cid))
        return done

    # -- 4. watchdog ----------------------------------------------------------------------------

    def kick_stalled(self) -> list[str]:
        stall = self.config.stall_seconds
        with self.db.session() as s:
            ids = [r.id for r in s.execute(_STALLED, {"stall": stall, "n": self.config.batch})]
        kicked: list[str] = []
        for cid in ids:
            if self.stopping or not self._due(cid):
                continue
            try:
                if self._kick(cid, stall):
                    kicked.append(str(cid))
            except errors.Unavailable as exc:
                log.warning("campaign=%s watchdog restart postponed: %s", cid, exc.message)
                self._later(cid, RETRY_UNAVAILABLE_SECONDS)
            except errors.ServiceError as exc:
                log.warning("campaign=%s watchdog restart failed: %s", cid, exc.message)
                self._later(cid, RETRY_REFUSED_SECONDS)
        return kicked

    def _kick(self, cid: uuid.UUID, stall: float) -> bool:
        """New epoch + StartDispatch, holding the campaign row FOR UPDATE so leases wait for the
        commit and see the new epoch; a dispatcher failure rolls the epoch back."""
        try:
            with self.db.transaction() as s:
                set_lock_timeout(s)
                c = s.execute(_LOCK_STALLED, {"cid": str(cid), "stall": stall}).one_or_none()
                if c is None:
                    return False
                chip_ids = messages_repo.open_chip_ids(s, cid)
                usable = [ch for ch in chips_repo.by_ids(s, c.user_id, chip_ids) if ch.state != CHIP_RESTRICTED]
                if not usable:
                    transitions.auto_pause(s, cid, chips.NO_CHIP_LEFT, "campaign.auto_pause")
                    return False
                settings = convert.settings_from_json(c.settings)
                lanes = [self._lane(ch, settings) for ch in usable]
                recheck = _window_recheck([ln.pacing for ln in lanes], stall, time.time())
                if recheck is not None:
                    self._later(cid, recheck)  # closed (or just opened) windows: silence is expected
                    return False
                floor = self._kicked_epoch.get(cid, 0) + 1
                epoch = s.execute(text(
                    "UPDATE campaigns SET dispatch_epoch = greatest(dispatch_epoch + 1, :floor) WHERE id = :cid "
                    "RETURNING dispatch_epoch"), {"cid": str(cid), "floor": floor}).scalar_one()
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
                self._kicked_epoch[cid] = epoch
                self.dispatcher.start(str(cid), epoch, lanes, pacing.effective_camouflage(settings.camouflage))
                log.warning("campaign=%s watchdog: lanes silent for %.0fs with work left, dispatch restarted "
                            "at epoch %d over %d chips", cid, stall, epoch, len(usable))
                return True
        except Exception as exc:
            if is_lock_timeout(exc):
                return False
            raise

    def _lane(self, ch: Any, settings: Any) -> Lane:
        return lane_for(ch, settings.pacing, SecretBox(self.settings.secret_keys))


WINDOW_RECHECK_SECONDS = 60.0


def _window_recheck(lane_pacing: list[res.Pacing], stall: float, now: float) -> float | None:
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


def _is_db_down(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError)


def start(db: Database, settings: Settings, ops: CampaignLifecycle | None = None) -> Scheduler:
    """Start the background thread (called by campaign_service.server); `.stop()` ends it."""
    return Scheduler(db, settings, ops=ops).start()
