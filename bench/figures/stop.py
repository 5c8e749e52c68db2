"""Stop figures: CancelCampaign and PauseCampaign under a constant ~1,000 running lanes.

The load never falls during the samples: every cancelled campaign is replaced at once by a fresh
running one (on chips that rested REST_STEPS steps), and every paused campaign is resumed one step
later while the next one is paused, so `lanes` lanes keep sending (every 4-6 s per chip) around every
sample. A chip is one sandbox session, used by one campaign at a time, so a request is attributed
to its campaign by session: any request of a stopped campaign's sessions that arrives at the
sandbox after its RPC returned and before those chips' next campaign was started (Pause: before its
Resume was called) breaks the stop fence and errs the row."""

from __future__ import annotations

import bisect
import itertools
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis as redis_sync

from bench.api import CONTACT_COLUMNS, Api, contact_tuples, copy_rows
from bench.core import Ctx, PySpy, Result, pct
from bench.figures.prep import cleanup
from dispatcher_service import keys
from waha_sandbox.control import SandboxControl
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.dispatcher.v1 import dispatcher_service_pb2 as dpb

TARGET_MS = 250.0
# Chip and campaign pacing, random in [4 s, 6 s]: ~200 sends/s from 1,000 lanes. At the `lanes` figure's
# 1 s on this shared 2-core machine the one worker fell behind (lane heartbeats lapsed, takeovers,
# the watchdog restarting silent campaigns), so a stop was measured inside a collapse, not a load;
# WAHA's own advice is 30-60 s between messages, so this is still ~10x a real tenant's rate.
INTERVAL = (4.0, 6.0)
LATENCY_MS = 20  # sandbox latency per request, so sends are in flight when a stop comes
STEP_GAP_S = 0.25  # between two samples (after the replacement started)
ACTIVE_WINDOW_S = 8.0  # a lane "sent lately" at a sample when its session had a request this long before
ALIVE = (dpb.LANE_STATE_QUEUED, dpb.LANE_STATE_RUNNING)
# Users the campaigns are spread over (a campaign's chips are its owner's); BENCH_STOP_TENANTS=1 puts
# all 1,000 lanes on one tenant (its reports then all reach one users row: see the README's `cancel`).
TENANTS = int(os.environ.get("BENCH_STOP_TENANTS", "10"))
REST_STEPS = 10  # Cancel: steps a cancelled campaign's chips rest before the next campaign uses them


@dataclass
class Camp:
    """One campaign of the figure: its id, chips and their sessions (a chip serves one campaign at a time)."""

    id: str
    sessions: set[str]
    chip_ids: list[str]
    api: Api
    started: bool = False


@dataclass
class Sample:
    campaign: Camp
    called: float  # wall time just before the RPC
    returned: float  # wall time just after it returned
    ms: float
    until: float = float("inf")  # late window end (Pause: its Resume; Cancel: its chips' next Start)
    alive: int = 0  # lanes of the running campaigns QUEUED or RUNNING (Redis lane state) just before
    had_work: bool = False  # the campaign still had messages to send at its stop
    extra_ms: dict[str, float] = field(default_factory=dict)


def _seed(ctx: Ctx, ids: list[str], per: int) -> None:
    """Contacts for every campaign in one COPY (the shape ImportContacts leaves), one ANALYZE."""
    st = ctx.stack
    with st.db() as conn, conn.cursor() as cur:
        copy_rows(cur, "campaign_contacts", CONTACT_COLUMNS, itertools.chain.from_iterable(
            contact_tuples(cid, per) for cid in ids))
        cur.execute("UPDATE campaigns SET total_contacts = total_contacts + %s WHERE id = ANY(%s::uuid[])",
                    (per, ids))
    with st.db(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE campaign_contacts")


def _build(ctx: Ctx, apis: list[Api], count: int, sets: int, chips_per: int, per_chip: int, mode: str
           ) -> list[Camp]:
    """`count` seeded DRAFT campaigns over `sets` sets of `chips_per` sandbox chips (paced at
    INTERVAL): campaign k on set k % sets, so a set rests between two campaigns; set i belongs to
    tenant i % len(apis)."""
    st = ctx.stack
    iv = INTERVAL
    with futures.ThreadPoolExecutor(len(apis)) as pool:  # registrations serialize per user
        chips = list(pool.map(lambda i: [apis[i % len(apis)].chip(st.sandbox_url, interval=iv)
                                         for _ in range(chips_per)], range(sets)))

        def one(k: int) -> Camp:
            api, cl = apis[(k % sets) % len(apis)], chips[k % sets]
            c = api.campaign(cl, name=f"bench {mode} {k}", interval=iv, camouflage=False)
            return Camp(c.id, {ch.waha_session for ch in cl}, [ch.id for ch in cl], api)

        camps = list(pool.map(one, range(count)))
    _seed(ctx, [c.id for c in camps], chips_per * per_chip)
    return camps


def _timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """(wall before, wall after, ms, result) of one blocking RPC."""
    w0, t0 = time.time(), time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t0) * 1000
    return w0, time.time(), ms, out


def fig_cancel(ctx: Ctx) -> None:
    _stop_figure(ctx, "cancel")


def fig_pause(ctx: Ctx) -> None:
    _stop_figure(ctx, "pause")


def _stop_figure(ctx: Ctx, mode: str) -> None:
    lanes = ctx.n(1000, 50)
    chips_per = 20 if lanes >= 200 else 5
    running = lanes // chips_per
    want = ctx.n(100, 20)  # samples
    verb = "CancelCampaign" if mode == "cancel" else "PauseCampaign"
    r = ctx.row("", f"{verb} with {running * chips_per} lanes running all along ({running} campaigns x {chips_per} "
                    f"chips at {INTERVAL[0]:g}-{INTERVAL[1]:g} s, sandbox {LATENCY_MS} ms), {want} samples: "
                    "p99 RPC to confirmed",
                "ms", f"p99 < {TARGET_MS:.0f} ms, 0 late requests")
    st = ctx.stack
    sb = st.sandbox
    ctx.api()  # services up
    # Campaigns spread over TENANTS users: one user owning all 1,000 lanes serialized every delivery
    # report on its users row (credit CONSUME), see the README's `cancel` row.
    tenants = min(TENANTS, running)
    with futures.ThreadPoolExecutor(3) as pool:  # each is a process start: 10 at once timed out at load 56
        keys_ = list(pool.map(lambda _: st.create_user(), range(tenants)))
        apis = [Api(st.channel, key) for key in keys_]
    # Cancel: a fresh campaign replaces each cancelled one (`want` more campaigns), on a chip set
    # that rested REST_STEPS steps: the cancelled campaign's late window lasts until its chips'
    # next campaign starts. A campaign lives ~`running` steps. Pause: one campaign more than
    # `running`; each is paused one step in `running + 1`, its late window lasting until its Resume.
    total, sets = (running + want + 5, running + REST_STEPS) if mode == "cancel" else (running + 1, running + 1)
    per_chip = 100  # messages per lane: more than a lane sends in the figure (~20)
    for key in keys_:  # few tenants: each owns more chips and campaigns than the default quotas
        st.set_limits(key, chips=sets * chips_per, campaigns=total + 10)
    st.start_worker(DISPATCH_MAX_JOBS=str(max(2000, 2 * lanes + 200)))
    t_setup = time.perf_counter()
    camps = _build(ctx, apis, total, sets, chips_per, per_chip, mode)
    setup_s = time.perf_counter() - t_setup
    sb.reset()
    sb.configure(latency_ms=LATENCY_MS)
    samples: list[Sample] = []
    other_ms: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    wall0 = time.time()
    try:
        first = camps[:running] if mode == "cancel" else camps
        for c in first:
            c.api.start(c.id)
            c.started = True
        ramp = r.details["ramp"] = _ramp(sb, first, running * chips_per)
        if ramp[-1][1] < 0.95 * running * chips_per:
            errors.append(f"only {ramp[-1][1]} of {running * chips_per} lanes had sent after {ramp[-1][0]} s")
        spare = iter(camps[running:])
        live = list(first)  # FIFO: the oldest running campaign is stopped next
        paused: Sample | None = None
        rd = redis_sync.Redis.from_url(st.env["REDIS_URL"])
        t_loop = time.monotonic()
        with PySpy(st.pid("campaign"), 30, str(st.workdir / f"pyspy-{mode}-campaign.txt")) as spy_c, \
                PySpy(st.pid("dispatcher"), 30, str(st.workdir / f"pyspy-{mode}-dispatcher.txt")) as spy_d:
            for _ in range(want * 2):
                if len(samples) >= want or time.monotonic() - t_loop > 600:
                    break
                alive = _alive(rd, live)
                c = live.pop(0)
                if mode == "cancel":
                    w0, w1, ms, got = _timed(lambda c=c: c.api.cancel(c.id))  # type: ignore[misc]
                    s = Sample(c, w0, w1, ms, had_work=got.failed_count > 0)
                    nxt = next(spare)
                    if len(samples) >= REST_STEPS:  # nxt runs on the chips of this earlier sample's campaign
                        samples[len(samples) - REST_STEPS].until = time.time()
                    _, _, start_ms, _ = _timed(lambda n=nxt: n.api.start(n.id))  # type: ignore[misc]
                    nxt.started = True
                    other_ms["start_replacement"].append(start_ms)
                    live.append(nxt)
                else:
                    w0, w1, ms, got = _timed(lambda c=c: c.api.campaigns.PauseCampaign(  # type: ignore[misc]
                        cs.PauseCampaignRequest(campaign_id=c.id), metadata=c.api.md, timeout=60))
                    s = Sample(c, w0, w1, ms, had_work=got.pending_count > 0)
                    if paused is not None:
                        p = paused
                        p.until, _, resume_ms, _ = _timed(lambda p=p: p.campaign.api.campaigns.ResumeCampaign(  # type: ignore[misc]
                            cs.ResumeCampaignRequest(campaign_id=p.campaign.id), metadata=p.campaign.api.md,
                            timeout=60))
                        other_ms["resume"].append(resume_ms)
                        live.append(p.campaign)
                    paused = s
                s.alive = alive
                samples.append(s)
                time.sleep(STEP_GAP_S)
            if paused is not None:
                paused.until = time.time()  # still paused: its window ends now
        loop_s = time.monotonic() - t_loop
        time.sleep(1.5)  # anything late still has time to arrive
        _fill(r, samples, sb.requests(since=wall0), running * chips_per, errors)
        r.details.update(samples=len(samples), setup_s=round(setup_s, 1), loop_s=round(loop_s, 1),
                         lanes_running=running * chips_per, campaigns_running=running, chips_per_campaign=chips_per,
                         messages_per_lane=per_chip, tenants=len(apis), interval_s=list(INTERVAL),
                         sandbox_latency_ms=LATENCY_MS,
                         step_gap_s=STEP_GAP_S, campaigns_used=sum(c.started for c in camps))
        for name, vals in other_ms.items():
            r.details[f"{name}_ms"] = {"p50": pct(vals, 50), "p99": pct(vals, 99), "max": max(vals)}
        for name, spy in (("campaign", spy_c), ("dispatcher", spy_d)):
            if spy.summary():
                r.details[f"pyspy_{name}_30s"] = spy.summary()
        if len(samples) < want:
            errors.append(f"only {len(samples)} of {want} samples in time")
        if errors:
            r.error = "; ".join(errors)
    finally:
        sb.configure(latency_ms=0)
        with futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(_cleanup, camps))
        sb.reset()
        st.start_worker()  # back to the stack's usual worker


def _ramp(sb: SandboxControl, camps: list[Camp], lanes: int, timeout: float = 240.0) -> list[tuple[float, int]]:
    """Wait until nearly every lane has sent (its first request reached the sandbox). Returns the
    ramp (seconds, lanes that have sent); the last entry short of 95% means it never got there
    (the samples are still taken, and the row errs)."""
    sessions = set().union(*(c.sessions for c in camps))
    seen: set[str] = set()
    t0, since = time.monotonic(), 0.0
    ramp: list[tuple[float, int]] = []
    for _ in range(int(timeout / 2) + 1):
        time.sleep(2.0)
        got = sb.requests(since=since or None)
        since = max((q["ts"] for q in got), default=since)
        seen |= {q["session"] for q in got} & sessions
        ramp.append((round(time.monotonic() - t0, 1), len(seen)))
        if len(seen) >= 0.95 * lanes:
            break
    return ramp


def _alive(rd: redis_sync.Redis, camps: list[Camp]) -> int:
    """Lanes of these campaigns QUEUED or RUNNING in the dispatcher's own state (one pipeline)."""
    p = rd.pipeline(transaction=False)
    for c in camps:
        for chip in c.chip_ids:
            p.hget(keys.lane(c.id, chip), "state")
    return sum(1 for v in p.execute() if v is not None and int(v) in ALIVE)


def _cleanup(c: Camp) -> None:
    try:
        cleanup(c.api, c.id)
    except grpc.RpcError:
        pass


def _fill(r: Result, samples: list[Sample], reqs: list[dict[str, Any]], lanes: int, errors: list[str]) -> None:
    """p50/p99 of the samples, late requests per stopped campaign, and the load around each sample
    (sessions that had a request in the ACTIVE_WINDOW_S before it)."""
    lat = [s.ms for s in samples]
    by_session: dict[str, list[float]] = defaultdict(list)
    for q in reqs:
        if q.get("session"):
            by_session[q["session"]].append(q["ts"])
    for ts in by_session.values():
        ts.sort()
    late = 0
    late_paths: dict[str, int] = defaultdict(int)
    inflight_at_return = 0
    of_session: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        for sess in s.campaign.sessions:
            of_session[sess].append(s)
    for q in reqs:
        for s in of_session.get(q.get("session") or "", ()):
            if s.returned < q["ts"] < s.until:
                late += 1
                late_paths[q["path"]] += 1
            elif q["ts"] <= s.returned and (q.get("ts_done") or 0) >= s.called:
                inflight_at_return += 1  # in the air when the stop came: the fence had to wait for it
    durations = [(q["ts_done"] - q["ts"]) * 1000 for q in reqs if q.get("ts_done")]
    alive = [s.alive for s in samples]
    active: list[int] = []
    for s in samples:  # sessions that sent just before, of campaigns not stopped at that moment
        lo = s.called - ACTIVE_WINDOW_S
        active.append(sum(1 for k, ts in by_session.items() if _any_in(ts, lo, s.called)
                          and not any(o.returned < s.called < o.until for o in of_session.get(k, ()))))
    r.value = pct(lat, 99)
    r.met = bool(lat) and r.value < TARGET_MS and late == 0
    r.details.update(p50_ms=pct(lat, 50), p90_ms=pct(lat, 90), max_ms=max(lat, default=0.0),
                     late_requests=late, late_paths=dict(late_paths),
                     requests_in_flight_during_stop=inflight_at_return,
                     samples_with_work_left=sum(s.had_work for s in samples),
                     lanes_alive_at_sample={"min": min(alive, default=0), "p50": pct(alive, 50),
                                            "max": max(alive, default=0), "target": lanes},
                     lanes_sent_in_last_8s_at_sample={"min": min(active, default=0), "p50": pct(active, 50),
                                                      "max": max(active, default=0)},
                     sandbox_request_ms={"p50": pct(durations, 50), "p99": pct(durations, 99),
                                         "max": max(durations, default=0.0)},
                     sandbox_requests=len(reqs), duplicates=sum(1 for q in reqs if q.get("duplicate")))
    if late:
        errors.append(f"{late} sandbox requests of a stopped campaign arrived after its RPC returned")
    if alive and pct(alive, 50) < 0.9 * lanes:
        errors.append(f"load not constant: median {pct(alive, 50)} of {lanes} lanes alive at a sample")
    if sum(s.had_work for s in samples) < len(samples):
        errors.append(f"{len(samples) - sum(s.had_work for s in samples)} samples stopped a campaign with no work left")


def _any_in(ts: list[float], lo: float, hi: float) -> bool:
    i = bisect.bisect_left(ts, lo)
    return i < len(ts) and ts[i] < hi
