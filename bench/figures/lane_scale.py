"""Lanes on one worker: 1k / 5k / 10k chips paced at 1 s, then 10k at the shortest interval this
machine carries. Lateness, early sends and missing sends are all measured at the sandbox, per session."""

from __future__ import annotations

import itertools
import math
import os
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.api import Api, seed_contacts
from bench.core import Ctx, PySpy, Result, RssSampler, pct
from bench.figures.prep import cleanup, settle
from bench.stack import read_status_kb
from whago.campaign.v1 import resources_pb2 as res

SIZES = (1000, 5000, 10000)
# Sends per lane: 12 up to 1,000 lanes at 1 s, so that a stack that starts 1,000 lanes within a few
# seconds has them all sending together for seconds (with 5, the lanes' start took 7 s and each lane
# was done within 4 s of its own start: never all at once, a figure the pacing of a few hundred
# lanes met); 3 (2 gaps, still 10,000-20,000 gaps) for the larger sizes and the interval search, so
# a run that the machine cannot carry ends within minutes.
PER_CHIP = 12
PER_CHIP_LARGE = 3
# A gap shorter than the interval by more than this is an EARLY send (a pacing violation). Both ends
# of a gap are the sandbox's own time.time() at arrival (one clock, one process), and the chip's pace
# is enforced from the END of its previous send (Redis TIME, same host clock), so a correct gap is
# never below the interval; the tolerance only covers Lua's tostring keeping 14 digits (stored
# times rounded by < 0.1 ms) and clock slewing, with a 10x margin.
EARLY_TOLERANCE_S = 0.001
RSS_TARGET_MB = 1024.0
LATENESS_TARGET_MS = 250.0
# Intervals tried for "10k lanes at the shortest interval carried": from the estimate, downwards
# while carried, upwards while not.
CARRY_INTERVALS = (1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
CARRY_TRIES = 3
CARRY_HEADROOM = 0.75  # aim at this share of the send rate the 1 s run carried


@dataclass
class LaneRun:
    """What one run measured (everything at the sandbox is per session)."""

    lanes: int
    interval: float
    per_chip: int
    rss_mb: float = 0.0
    p99_ms: float = math.nan
    early: int = 0
    missing: int = 0
    extra: int = 0
    duplicates: int = 0
    # How long every lane was sending at once: from the last lane's first send to the first lane's
    # last one. Under one interval, the lanes never ran together (they started more slowly than each
    # one ended) and the run measured the pacing of fewer lanes than its name says.
    together_s: float = math.nan
    state: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every send arrived once, none early, lateness within target and the campaign completed."""
        return (self.early == 0 and self.missing == 0 and self.extra == 0 and self.duplicates == 0
                and self.state == "CAMPAIGN_STATE_COMPLETED" and self.p99_ms < LATENESS_TARGET_MS
                and self.together_s >= self.interval)

    def violations(self) -> str:
        v = [f"{n} {what}" for n, what in ((self.early, "early sends"), (self.missing, "sends missing"),
                                            (self.extra, "sends too many"), (self.duplicates, "duplicate sends"))
             if n]
        if self.state != "CAMPAIGN_STATE_COMPLETED":
            v.append(f"campaign ended {self.state}")
        if not self.together_s >= self.interval:
            rate = self.details.get("send_rate_per_s") or 0.0
            v.append(f"the {self.lanes} lanes never sent together for one interval (together {self.together_s:.1f} s; "
                     f"lanes started over {self.details.get('lane_first_send_max_s', math.nan):.1f} s; "
                     f"{rate:.0f} sends/s carried of {self.lanes / self.interval:.0f} required)")
        return ", ".join(v)


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _commandstats(r: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = r.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if isinstance(v, dict)}


def _chips(ctx: Ctx, api: Api, n: int) -> list[res.Chip]:
    """n sandbox chips paced at 1 s (the campaign's pacing decides the interval of each run): one
    registered through ChipService, the rest copied from it in SQL with their own number and
    session (a fixture, not what is measured: RegisterChip one by one took minutes for 10,000, and
    the per-user chip quota would refuse them)."""
    first = api.chip(ctx.stack.sandbox_url, interval=(1.0, 1.0))
    rows = ctx.stack.sql(
        "INSERT INTO chips (id, user_id, display_name, phone, waha_base_url, waha_session, waha_api_key, "
        "proxy_label, state, state_reason, pacing, warmup) "
        "SELECT gen_random_uuid(), c.user_id, c.display_name, '5519' || lpad((%s + g)::text, 9, '0'), "
        "c.waha_base_url, 'b-' || substr(md5(random()::text || g::text), 1, 12), c.waha_api_key, c.proxy_label, "
        "c.state, c.state_reason, c.pacing, c.warmup FROM chips c, generate_series(1, %s) g WHERE c.id = %s "
        "RETURNING id, waha_session", (secrets.randbelow(10**8), n - 1, first.id))
    return [first, *(res.Chip(id=str(cid), waha_session=str(session)) for cid, session in rows)]


def _run(ctx: Ctx, api: Api, chips: list[res.Chip], interval: float, spy_name: str = "") -> LaneRun:
    """One campaign on `chips` (a fresh worker), PER_CHIP messages each, chip and campaign pacing
    min = max = `interval`, to COMPLETED; RSS, CPU and Redis calls per send, and what the sandbox got."""
    st = ctx.stack
    sb = st.sandbox
    lanes = len(chips)
    per_chip = PER_CHIP if lanes <= 1000 and interval == 1.0 else PER_CHIP_LARGE
    run = LaneRun(lanes, interval, per_chip)
    st.start_worker(DISPATCH_MAX_JOBS=str(max(2000, lanes + 100)))
    pid = st.pid("worker")
    rss_idle = read_status_kb(pid, "VmRSS")
    camp = api.campaign(chips, name=f"bench lanes {lanes}x{interval:g}s", interval=(interval, interval),
                        camouflage=False)
    seed_contacts(st, camp.id, lanes * per_chip)
    settle(st)
    sb.reset()
    rc = redis.Redis.from_url(st.redis.url)
    try:
        rc.config_resetstat()
        load0 = os.getloadavg()
        cpu0 = st.cpu()
        spy_out = str(st.workdir / f"pyspy-{spy_name}.txt")
        with RssSampler(pid, 0.2) as sampler, PySpy(pid, 20, spy_out) as spy:
            t0, wall0 = time.perf_counter(), time.time()
            api.start(camp.id)
            start_s = time.perf_counter() - t0
            try:  # bounded: a run the machine cannot carry is measured as far as it got
                c = api.wait(camp.id, lambda x: x.state != res.CAMPAIGN_STATE_RUNNING,
                             timeout=per_chip * interval + 60 + lanes * per_chip / 100, poll=0.5)
            except TimeoutError:
                c = api.get(camp.id)
            secs, wall1 = time.perf_counter() - t0, time.time()
        cpu1 = st.cpu()
        load1 = os.getloadavg()
        cmds = _commandstats(rc)
        hwm = read_status_kb(pid, "VmHWM")
        run.state = res.CampaignState.Name(c.state)
        run.rss_mb = max(sampler.peak_kb, hwm) / 1024
        sessions = {ch.waha_session for ch in chips}
        by_session: dict[str, list[float]] = defaultdict(list)
        reqs = sb.requests(path="/api/send")
        for q in reqs:
            if q["session"] in sessions and q["status"] == 201:
                if q["duplicate"]:
                    run.duplicates += 1
                else:
                    by_session[q["session"]].append(q["ts"])
        gaps: list[float] = []
        firsts: list[float] = []
        lasts: list[float] = []
        for s in sessions:
            ts = sorted(by_session.get(s, []))
            run.missing += max(0, per_chip - len(ts))
            run.extra += max(0, len(ts) - per_chip)
            gaps += [b - a for a, b in itertools.pairwise(ts)]
            if ts:
                firsts.append(ts[0] - wall0)
                lasts.append(ts[-1] - wall0)
        run.early = sum(1 for g in gaps if g < interval - EARLY_TOLERANCE_S)
        lateness = [(g - interval) * 1000 for g in gaps]
        run.p99_ms = pct(lateness, 99)
        run.together_s = min(lasts, default=0.0) - max(firsts, default=0.0) if len(firsts) == lanes else 0.0
        sends = sum(len(v) for v in by_session.values())
        # The rate carried: sends between the 10th and 90th percentile of arrival (lane start-up and
        # the tail left out).
        arrivals = sorted(t for v in by_session.values() for t in v)
        t10, t90 = pct(arrivals, 10), pct(arrivals, 90)
        carried = 0.8 * len(arrivals) / (t90 - t10) if len(arrivals) > 10 and t90 > t10 else 0.0
        per_send = max(1, sends)
        if spy.summary():
            run.details["pyspy_worker_first_20s"] = spy.summary()
        run.details.update(
            lanes=lanes, interval_s=interval, sends_per_lane=per_chip, sends_expected=lanes * per_chip,
            sends_arrived=sends,
            sends_missing=run.missing, sends_extra=run.extra, duplicate_sends=run.duplicates,
            early_sends=run.early, early_tolerance_ms=EARLY_TOLERANCE_S * 1000, state=run.state,
            gaps=len(gaps), lateness_p50_ms=pct(lateness, 50), lateness_p90_ms=pct(lateness, 90),
            lateness_p99_ms=run.p99_ms, lateness_max_ms=max(lateness, default=math.nan),
            min_gap_s=min(gaps, default=math.nan),
            required_rate_per_s=lanes / interval, send_rate_per_s=carried,
            worker_rss_peak_mb=run.rss_mb, worker_rss_idle_mb=rss_idle / 1024,
            worker_rss_sampled_peak_mb=sampler.peak_kb / 1024, worker_vmhwm_mb=hwm / 1024,
            worker_max_threads=sampler.max_threads, worker_max_open_fds=sampler.max_fds,
            start_rpc_s=start_s, seconds_to_final=secs,
            lane_first_send_p50_s=pct(firsts, 50), lane_first_send_max_s=max(firsts, default=math.nan),
            last_send_s=max(lasts, default=math.nan), all_lanes_together_s=run.together_s,
            completed_after_last_send_s=(wall1 - wall0) - max(lasts, default=0.0),
            cpu_ms_per_send={k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1000 / per_send, 4) for k in cpu1},
            cpu_ms_per_send_total=round(sum(cpu1[k] - cpu0.get(k, 0.0) for k in cpu1) * 1000 / per_send, 4),
            redis_calls_per_send={k: round(v / per_send, 3) for k, v in
                                  sorted(cmds.items(), key=lambda kv: -kv[1]) if v / per_send >= 0.01},
            redis_calls_per_send_total=round(sum(cmds.values()) / per_send, 3),
            loadavg_1m_before=round(load0[0], 2), loadavg_1m_after=round(load1[0], 2),
        )
        return run
    finally:
        rc.close()
        cleanup(api, camp.id)
        sb.reset()


def _fill(rss: Result, late: Result, run: LaneRun) -> None:
    rss.value = run.rss_mb
    rss.met = run.rss_mb < RSS_TARGET_MB and not run.violations()
    late.value = run.p99_ms
    late.met = run.ok
    late.details.update(run.details)
    rss.details.update({k: run.details[k] for k in ("worker_rss_idle_mb", "worker_rss_sampled_peak_mb",
                                                      "worker_vmhwm_mb", "worker_max_threads",
                                                      "worker_max_open_fds", "cpu_ms_per_send", "sends_arrived")})
    v = run.violations()
    if v:
        late.error = rss.error = v


def _carry_start(lanes: int, rate: float) -> float:
    """The first interval to try: the one whose rate is CARRY_HEADROOM of what was achieved."""
    want = lanes / max(1.0, rate * CARRY_HEADROOM)
    return next((i for i in CARRY_INTERVALS if i >= want), CARRY_INTERVALS[-1])


def fig_lanes(ctx: Ctx) -> None:
    sizes = sorted({ctx.n(s, 50) for s in SIZES})
    api = ctx.api()
    chips = _chips(ctx, api, max(sizes))
    rows: list[tuple[int, Result, Result]] = []
    for n in sizes:
        lab = _label(n)
        rows.append((n, ctx.row(f"{lab}.rss", f"{n} lanes at 1 s on one worker: worker peak RSS", "MB", "< 1024 MB"),
                     ctx.row(f"{lab}.lateness", f"{n} lanes at 1 s: p99 send lateness (gap - 1 s, at the sandbox; "
                             "early or missing sends, or lanes never all sending at once, fail it)", "ms",
                             "p99 < 250 ms, 0 early, all arrived, together")))
    last: LaneRun | None = None
    for n, rss, late in rows:
        last = _run(ctx, api, chips[:n], 1.0, spy_name=f"lanes-{n}")
        _fill(rss, late, last)
    if last is None:
        return
    n = last.lanes
    carry = ctx.row(f"{_label(n)}.shortest_interval",
                    f"{n} lanes on one worker: shortest interval carried (p99 lateness < 250 ms, 0 early, "
                    "all arrived, all lanes sending together)", "s", "reported")
    rate = float(last.details.get("send_rate_per_s") or 0.0)
    tried: list[dict[str, Any]] = []
    runs: dict[float, LaneRun] = {1.0: last}
    i = CARRY_INTERVALS.index(1.0 if last.ok else _carry_start(n, rate))
    for _ in range(len(CARRY_INTERVALS)):
        interval = CARRY_INTERVALS[i]
        if interval not in runs and len(runs) > CARRY_TRIES:
            break  # (the 1 s run is not a try)
        run = runs.get(interval) or _run(ctx, api, chips[:n], interval, spy_name=f"lanes-{n}-{interval:g}s")
        if interval not in runs:
            runs[interval] = run
            tried.append({k: run.details.get(k) for k in (
                "interval_s", "lateness_p99_ms", "lateness_max_ms", "early_sends", "sends_missing", "send_rate_per_s",
                "required_rate_per_s", "all_lanes_together_s", "worker_rss_peak_mb", "cpu_ms_per_send_total",
                "state", "loadavg_1m_before", "loadavg_1m_after")})
        if run.ok and (carry.value is None or interval < carry.value):
            carry.value = interval
            carry.details.update(run.details)
        lower = CARRY_INTERVALS[i - 1] if i > 0 else None
        if run.ok and lower is not None and lower not in runs:
            i -= 1  # carried: try the next shorter one
        elif not run.ok and carry.value is None and i + 1 < len(CARRY_INTERVALS):
            i += 1  # not carried and none yet: the next longer one
        else:
            break
    carry.details.update(tried=tried, achieved_rate_at_1s_per_s=rate)
    if carry.value is None:
        carry.error = f"no interval up to {tried[-1]['interval_s'] if tried else '?'} s was carried: {tried}"[:600]
