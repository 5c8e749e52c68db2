"""What every part of a lane shares: the worker's resources, the lane's exceptions, its tuning
constants and small helpers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

from arq.connections import ArqRedis

from dispatcher_service import fences as fences_mod
from dispatcher_service import keys
from dispatcher_service.config import Config
from dispatcher_service.delivery import DeliveryClient, LeaseBatcher, ReportBatcher
from dispatcher_service.fence_watch import FenceWatch
from dispatcher_service.lane.heartbeat import Heartbeats
from dispatcher_service.pacing import Pacer
from dispatcher_service.redis_batch import RedisBatch
from dispatcher_service.store import Store
from dispatcher_service.waha.transport import HttpClient
from whago.campaign.v1 import delivery_service_pb2 as dpb

log = logging.getLogger("dispatcher.lane")
T = TypeVar("T")

# Media sends cannot carry a pre-chosen id (not in WAHA's spec), so their ATTEMPTING id is a marker:
# a re-leased message carrying it cannot be looked up and becomes UNKNOWN instead of being resent.
UNVERIFIABLE_PREFIX = "unverifiable:"
OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
NOT_ON_WHATSAPP = "NOT_ON_WHATSAPP"
# Number checks (WAHA check-exists) are paced at a quarter of the chip's minimum gap, at most this.
CHECK_GAP_MAX = 1.0
MAX_BATCH = 50
# LeaseMessagesResponse.remaining counts a lane's PENDING messages up to max(max_messages, this).
REMAINING_COUNTED = 200
# Bursting lanes lease (and report) in larger batches: at full speed each lease and report costs the
# campaign service and PostgreSQL a transaction (a commit, the campaign row, four or five small
# statements) besides its per-message work; 400 (was 200) halves those at 10 messages per
# second per lane and more.
MAX_BATCH_BURST = 400
FENCE_POLL_SECONDS = 1.0
# Batches grow from this size. With DISPATCH_MESSAGE_IDS=waha, a batch's new-message-id requests run
# concurrently, this many under one fence token: all of a chunk start together, so the token's TTL
# (one WAHA timeout + margin) covers every one of them.
ID_CHUNK = 10
ID_CHUNK_BURST = 25  # bursting lanes take ids for larger batches: fewer fence round trips
# An ended send's in-flight token (full-speed chips) is released by the lane's next reservation
# (one Redis call per message fewer). Before any wait (sleep, report, lease) the lane releases it
# at once, and a timer this soon covers every other path, so a stop waiting for in-flight requests
# is never held back by a lane that went quiet (50 ms here doubled the Cancel p99 of `make bench`).
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
# A burst registers its sends with the reservation; registrations a burst did not use (it ran out of
# BURST_SECONDS first) cost one more Redis step to give back (pace_burst_return). So each lane sizes
# its bursts to what fitted in the time of the last ones (bursts.next_burst_size), up to BURST: a
# lane at ~160 sends/s took 25 and used ~16, one give-back per burst, ~10% of the worker's busy
# samples (py-spy, `make bench` dispatch under load). Sizes start at 25 and grow by half while they
# fit, up to 100 (BURST_SECONDS ends a burst first above ~1,000 sends/s): at 10 growing by a quarter
# up to 50, a 1,000-message lane at ~600 sends/s took ~30 bursts, each a Redis round trip with no
# send in the air (~2-3 ms on 2 shared cores), now ~22.
BURST = 100
BURST_START = 25
BURST_SECONDS = 0.1
# Prefetch: while a batch is sent, the next one is leased, given its WAHA ids and recorded as
# ATTEMPTING, so the sends never wait for the campaign service; only when the current batch is
# expected to take at most this long (its lease must outlast that wait plus its own sends).
PREFETCH_AHEAD_SECONDS = 10.0
# A bursting lane estimates 0.05 s per message (for its leases' length), so its full batch is 20 s
# "ahead": it still prefetches (the prefetched lease's length counts that wait too).
PREFETCH_AHEAD_SECONDS_BURST = 20.0
# A paced lane's slice spans at least this many of its gaps (within the job's time, see
# FencedLane.deadline): starting and ending a slice (arq job, lane lock, lane state, a lease, the
# release of what it held, the next job, ReportLaneWait) costs ~10 ms of CPU over the stack, which
# 60 s slices paid on every send of a chip paced at 30-60 s (`make bench` lanes: 1,000 lanes at
# 30 s, 1.66 leases and 12 ms of CPU per send; 10,000 lanes could not be carried even at 60 s).
SLICE_SENDS = 8
# A slice of a paced lane ends this long before arq's job timeout at the latest: its last lease
# must still cover one WAHA timeout and a margin after the slice (leasing.py `_batch`).
SLICE_LEASE_MARGIN = 20.0
# A slice deferring its successor at least this long (a cap or a closed window) tells the campaign
# service until when (ReportLaneWait), so the watchdog does not restart the silent lane meanwhile.
LANE_WAIT_REPORT_SECONDS = 10.0
LANE_WAIT_MAX_SECONDS = 7 * 86400 - 60  # ReportLaneWait takes at most 7 days ahead (a longer wait is cut)
# Slices of one worker in their start (lane lock, lane state, first lease) at once: the worker
# claims new jobs only while fewer are starting. 1,000 lanes starting together (one claim step
# started them all) made event-loop rounds of seconds: sends of running lanes late, and lane locks
# lapsing before the heartbeat's turn came; waiting inside the job instead ran into arq's job
# timeout with 10,000 lanes (the leases come no faster than the campaign service answers). 64 was
# the limit while each start paid a lease of its own; with leases coalesced (LeaseLanes) 64 left
# 15-35 % of the CPU idle as 10,000 lanes started; 512 started them no faster than 256.
STARTING_SLICES = 256


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
    leases: LeaseBatcher = field(init=False)
    batch: RedisBatch = field(init=False)
    beats: Heartbeats = field(init=False)
    fence_watch: FenceWatch = field(init=False)
    starting: int = 0  # slices in their start (STARTING_SLICES)

    def __post_init__(self) -> None:
        self.reports = ReportBatcher(self.delivery)
        self.leases = LeaseBatcher(self.delivery)
        self.batch = RedisBatch(self.redis)  # the lanes' per-send Redis steps, one pipeline per tick
        self.store = Store(self.redis, self.cfg.queue_name, self.batch)
        self.fences = self.store.fences
        self.pacer = Pacer(self.redis, batch=self.batch)
        self.fence_watch = FenceWatch(self.redis, FENCE_POLL_SECONDS)
        self.beats = Heartbeats(self.redis, keys.lane_beats(self.cfg.queue_name), int(self.cfg.lane_lock_ttl * 1000),
                                max(0.05, self.cfg.lane_lock_ttl / 4))


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


def now_report() -> dpb.DeliveryReport:
    r = dpb.DeliveryReport()
    r.time.seconds, r.time.nanos = divmod(time.time_ns(), 1_000_000_000)  # GetCurrentTime, cheaper
    return r


def answer_id(resp: Any) -> str:
    """The message id of a WAHA send answer (some engines nest it as {_serialized: ...})."""
    if not isinstance(resp, dict):
        return ""
    v = resp.get("id")
    if isinstance(v, dict):
        return str(v.get("_serialized") or v.get("id") or "")
    return str(v or "")


def ts_seconds(ts: Any) -> float:
    return float(ts.seconds) + ts.nanos / 1e9


@dataclass
class Prepared:
    """A leased batch; `todo` when every message got its WAHA id and ATTEMPTING is recorded."""

    resp: dpb.LeaseMessagesResponse
    todo: list[tuple[dpb.LeasedMessage, str]] | None = None
