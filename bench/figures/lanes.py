"""Lane figures: 1,000 lanes on one worker, lease+report throughput."""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from concurrent import futures

from bench.api import (
    seed_contacts,
    sql_campaign,
)
from bench.core import (
    Ctx,
    PySpy,
    RssSampler,
    pct,
    timed,
)
from bench.figures.prep import (
    LONG_INTERVAL,
    cleanup,
    settle,
)
from bench.stack import read_status_kb
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as res

# -- 8. 1,000 lanes at 1 s on one worker ------------------------------------------------------------

def fig_lanes(ctx: Ctx) -> None:
    lanes = ctx.n(1000, 50)
    per_chip = 5
    rss = ctx.row("rss", f"{lanes} lanes at 1 s on one worker: worker peak RSS", "MB", "< 250 MB")
    late = ctx.row("lateness", f"{lanes} lanes at 1 s: p99 send lateness (gap - 1 s)", "ms", "p99 < 200 ms")
    st = ctx.stack
    sb = st.sandbox
    api = ctx.api()
    # A fresh worker, so its RSS is this figure's alone.
    st.start_worker(DISPATCH_MAX_JOBS=str(max(2000, lanes + 100)))
    pid = st.pid("worker")
    rss_idle = read_status_kb(pid, "VmRSS")
    chips = [api.chip(st.sandbox_url, interval=(1.0, 1.0)) for _ in range(lanes)]
    camp = api.campaign(chips, name="bench lanes", interval=(1.0, 1.0), camouflage=False)
    seed_contacts(st, camp.id, lanes * per_chip)
    sb.reset()
    try:
        with RssSampler(pid, 0.2) as sampler, PySpy(pid, 20, str(st.workdir / "pyspy-lanes-worker.txt")) as spy:
            t0, wall0 = time.perf_counter(), time.time()
            start_s, _ = timed(lambda: api.start(camp.id))
            c = api.wait(camp.id, lambda x: x.state != res.CAMPAIGN_STATE_RUNNING,
                         timeout=per_chip * 1.0 + 180, poll=0.25)
            secs, wall1 = time.perf_counter() - t0, time.time()
        hwm = read_status_kb(pid, "VmHWM")
        if spy.summary():
            late.details["pyspy_worker_first_20s"] = spy.summary()
        rss.value = max(sampler.peak_kb, hwm) / 1024
        rss.met = rss.value < 250
        rss.details.update(idle_rss_mb=rss_idle / 1024, sampled_peak_mb=sampler.peak_kb / 1024, vmhwm_mb=hwm / 1024,
                           max_threads=sampler.max_threads, max_open_fds=sampler.max_fds,
                           seconds_to_final=secs, state=res.CampaignState.Name(c.state), sent=c.sent_count,
                           expected=lanes * per_chip)
        sessions = {ch.waha_session for ch in chips}
        by_session: dict[str, list[float]] = defaultdict(list)
        for q in sb.sends():
            if q["session"] in sessions:
                by_session[q["session"]].append(q["ts"])
        gaps: list[float] = []
        firsts: list[float] = []
        lasts: list[float] = []
        for ts in by_session.values():
            ts.sort()
            gaps += [b - a for a, b in itertools.pairwise(ts)]
            firsts.append(ts[0] - wall0)
            lasts.append(ts[-1] - wall0)
        if firsts:
            # Separates lane start-up (first send of each lane after Start) from pacing and from
            # completion detection (COMPLETED seen after the last send).
            rss.details.update(start_rpc_s=start_s, lane_first_send_p50_s=pct(firsts, 50),
                               lane_first_send_max_s=max(firsts), last_send_s=max(lasts),
                               completed_after_last_send_s=(wall1 - wall0) - max(lasts))
        lateness = [(g - 1.0) * 1000 for g in gaps]
        late.value = pct(lateness, 99)
        late.met = late.value < 200
        late.details.update(gaps=len(gaps), p50_ms=pct(lateness, 50), max_ms=max(lateness, default=0.0),
                            min_gap_s=min(gaps, default=0.0), sessions_seen=len(by_session),
                            gaps_under_1s=sum(1 for g in gaps if g < 0.999))
        if c.state != res.CAMPAIGN_STATE_COMPLETED:
            late.error = rss.error = f"campaign ended {res.CampaignState.Name(c.state)}, {c.sent_count} sent"
    finally:
        cleanup(api, camp.id)
        sb.reset()




# -- 10. LeaseMessages + ReportDeliveries, one message per call ------------------------------------

def fig_lease(ctx: Ctx) -> None:
    """DeliveryService's worst case, straight from client threads (no dispatcher): 16 lanes, each
    leasing ONE message and reporting it SENT, until the campaign is done. A reported rate (it was
    a test's `rate > 200` assertion); every message must be leased exactly once or the row errs."""
    lanes, per = 16, ctx.n(60, 10)
    r = ctx.row("", f"LeaseMessages + ReportDeliveries, {lanes} lanes, 1 message per call: calls/s", "calls/s",
                "reported")
    st = ctx.stack
    api = ctx.api()
    chips = [api.chip(st.sandbox_url, interval=LONG_INTERVAL) for _ in range(lanes)]
    cid = sql_campaign(st, st.user_id_of(api.key), [c.id for c in chips], state=res.CAMPAIGN_STATE_RUNNING)
    seed_contacts(st, cid, lanes * per)
    st.sql("INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, state, seq, template_index) "
           "SELECT %s, t.id, (CAST(%s AS uuid[]))[((t.rn - 1) %% %s) + 1], %s, t.rn, 0 "
           "FROM (SELECT id, row_number() OVER (ORDER BY row_no) AS rn FROM campaign_contacts "
           "WHERE campaign_id = %s) t RETURNING 1",
           (cid, [c.id for c in chips], lanes, res.MESSAGE_STATE_PENDING, cid))
    st.sql("UPDATE campaigns SET pending_count = %s, dispatch_epoch = 1, started_at = now() WHERE id = %s "
           "RETURNING 1", (lanes * per, cid))
    settle(st)
    stub = dgrpc.DeliveryServiceStub(st.channel)
    md = (("authorization", f"Bearer {st.token}"),)
    leased: list[str] = []
    calls = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def lane(chip_id: str) -> None:
        for _ in range(per + 1):
            if time.monotonic() > deadline:
                return
            got = stub.LeaseMessages(dpb.LeaseMessagesRequest(
                campaign_id=cid, chip_id=chip_id, epoch=1, max_messages=1, lease_seconds=60,
                lease_owner="bench-lease"), metadata=md, timeout=30)
            if not got.messages:
                with lock:
                    calls[0] += 1
                return
            m = got.messages[0]
            stub.ReportDeliveries(dpb.ReportDeliveriesRequest(campaign_id=cid, reports=[dpb.DeliveryReport(
                message_id=m.message_id, outcome=dpb.DELIVERY_OUTCOME_SENT, waha_message_id=f"wa-{m.message_id}")]),
                metadata=md, timeout=30)
            with lock:
                calls[0] += 2
                leased.append(m.message_id)

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, [c.id for c in chips]))
    elapsed = time.perf_counter() - t0
    r.value = calls[0] / elapsed
    r.details.update(messages=len(leased), seconds=elapsed, calls=calls[0], lanes=lanes)
    if len(leased) != lanes * per or len(set(leased)) != len(leased):
        r.error = f"{len(leased)} leases for {lanes * per} messages ({len(leased) - len(set(leased))} twice)"
