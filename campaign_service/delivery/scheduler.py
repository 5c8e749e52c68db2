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
   The restart itself is watchdog.py.

Jobs 2-4 read a bounded page of candidates per tick from the small tables (a `Rotation` carries
on where the last tick stopped), then probe each candidate's messages with its ids as literals.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from campaign_service import errors, metrics
from campaign_service.background import BackgroundLoop
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.delivery import chips, transitions, watchdog
from campaign_service.delivery.common import (
    CHIP_ACTIVE,
    PENDING,
    RUNNING,
    SCHEDULED,
    SENDING,
    is_lock_timeout,
    set_lock_timeout,
)
from campaign_service.dispatch import DispatcherClient
from campaign_service.ops.campaign_lifecycle import CampaignLifecycle
from campaign_service.secrets_box import SecretBox

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

# The chip sweep: (RUNNING campaign, chip out of rotation) pairs of the campaigns' owners a page at
# a time (small tables only), then one probe per pair with both ids as literals. Each branch is
# ordered as only its index is (ix_messages_lane by seq; the SENDING-only ix_messages_lease_expiry
# by expiry), so the planner reads that index whatever the statistics say: as an EXISTS, statistics
# taken while the campaign's messages were PENDING made it seq-scan the table for a lane with none
# left (181 ms a probe, every tick, at 2M rows), and the correlated EXISTS before it walked every
# message of the lane, sent ones included (37 ms).
_UNUSABLE_PAGE = text(f"""
SELECT c.id AS cid, ch.id AS chip FROM campaigns c
JOIN chips ch ON ch.user_id = c.user_id AND ch.state <> {CHIP_ACTIVE:d}
WHERE c.state = {RUNNING:d} AND (c.id, ch.id) > (:after_cid, :after_chip)
ORDER BY c.id, ch.id LIMIT :n""")
_LANE_HAS_MOVABLE = text(f"""
SELECT coalesce(
    (SELECT true FROM campaign_messages WHERE campaign_id = :cid AND chip_id = :chip AND state = {PENDING:d}
     ORDER BY seq LIMIT 1),
    (SELECT true FROM campaign_messages WHERE campaign_id = :cid AND chip_id = :chip AND state = {SENDING:d}
     AND lease_expires_at < now() AND waha_message_id IS NULL ORDER BY lease_expires_at LIMIT 1),
    false)""")

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

# Quiet campaigns probed per tick, and (campaign, chip) pairs of the chip sweep.
STALL_PROBES_PER_TICK = 200
UNUSABLE_PROBES_PER_TICK = 200


class Rotation:
    """A sweep's place among the rows it probes a page per tick, in key order (the first columns of
    the page's rows, bound as `names`): after a short page the next tick starts over, so each row
    is probed within a rotation however many there are, at a bounded cost per tick."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.after: tuple[Any, ...] = (_FIRST_ID,) * len(names)

    def page(self, s: Session, stmt: TextClause, n: int, **params: Any) -> list[Any]:
        rows = list(s.execute(stmt, {**params, **dict(zip(self.names, self.after, strict=True)), "n": n}))
        self.after = tuple(rows[-1][:len(self.names)]) if len(rows) == n else (_FIRST_ID,) * len(self.names)
        return rows


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
        self._running = Rotation("after")  # the completion sweep's place among RUNNING campaigns
        self._quiet = Rotation("after")  # the watchdog's among quiet ones
        self._unusable = Rotation("after_cid", "after_chip")  # the chip sweep's among its pairs

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
            page = self._unusable.page(s, _UNUSABLE_PAGE, UNUSABLE_PROBES_PER_TICK)
            pairs = [(r.cid, r.chip) for r in page
                     if s.execute(_LANE_HAS_MOVABLE, {"cid": r.cid, "chip": r.chip}).scalar_one()][:self.config.batch]
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
            page = [r.id for r in self._running.page(s, _RUNNING_PAGE, FINISHED_PROBES_PER_TICK)]
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
            page = [r.id for r in self._quiet.page(s, watchdog.QUIET_PAGE, STALL_PROBES_PER_TICK, stall=stall)]
            ids = [cid for cid in page if self._due(cid)
                   and s.execute(watchdog.HAS_STALLED_WORK, {"cid": cid}).scalar_one()][:self.config.batch]
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
        r = watchdog.restart_if_stalled(self.db, cid, stall, self._kicked_epoch, self.dispatcher,
                                        SecretBox(self.settings.secret_keys))
        if r.recheck is not None:
            self._later(cid, r.recheck)  # closed (or just opened) windows: silence is expected
        return r.epoch is not None


def _is_db_down(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError)


def start(db: Database, settings: Settings, ops: CampaignLifecycle | None = None) -> Scheduler:
    """Start the background thread (called by campaign_service.server); `.stop()` ends it."""
    return Scheduler(db, settings, ops=ops).start()
