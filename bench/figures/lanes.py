"""Lane figures: Cancel with 100 running lanes, lease+report throughput (lanes on one worker: lane_scale.py)."""

from __future__ import annotations

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
    pct,
)
from bench.figures.prep import (
    LONG_INTERVAL,
    cleanup,
    settle,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as res

# -- 7. CancelCampaign with 100 running lanes -------------------------------------------------------

def fig_cancel(ctx: Ctx) -> None:
    campaigns = ctx.n(20, 4)
    chips_per = 5
    per = ctx.n(6000, 400)  # enough that no campaign finishes before its Cancel, at full speed
    r = ctx.row("", f"CancelCampaign, {campaigns * chips_per} running lanes ({campaigns}x{chips_per}), "
                    "sandbox 20 ms: p99", "ms", "p99 < 500 ms, 0 late sends")
    st = ctx.stack
    sb = st.sandbox
    sb.reset()
    api = ctx.api()
    camps: list[tuple[res.Campaign, set[str]]] = []
    for k in range(campaigns):
        chips = [api.chip(st.sandbox_url) for _ in range(chips_per)]
        c = api.campaign(chips, name=f"bench cancel {k}", interval=(0.0, 0.0), camouflage=False)
        seed_contacts(st, c.id, per)
        camps.append((c, {ch.waha_session for ch in chips}))
    sb.configure(latency_ms=20)
    try:
        for c, _ in camps:
            api.start(c.id)
        # Lanes busy: wait (bounded) until every campaign has sent something.
        deadline = time.monotonic() + 30
        for c, _ in camps:
            api.wait(c.id, lambda x: x.sent_count > 0 or x.state != res.CAMPAIGN_STATE_RUNNING,
                     timeout=max(1.0, deadline - time.monotonic()), poll=0.05)
        lat: list[float] = []
        returned: list[tuple[float, set[str]]] = []
        running_at_cancel = 0
        for c, sessions in camps:
            before = api.get(c.id)
            if before.state != res.CAMPAIGN_STATE_RUNNING:
                continue  # finished (or auto-paused) before its turn: nothing to cancel, not a sample
            running_at_cancel += before.pending_count > 0
            t0 = time.perf_counter()
            api.cancel(c.id)
            lat.append((time.perf_counter() - t0) * 1000)
            returned.append((time.time(), sessions))
        time.sleep(1.5)
        late = 0
        late_paths: dict[str, int] = defaultdict(int)
        reqs = sb.requests(since=min(t for t, _ in returned))
        for t_ret, sessions in returned:
            for q in reqs:
                if q["session"] in sessions and q["ts"] > t_ret:
                    late += 1
                    late_paths[q["path"]] += 1
        if len(lat) < campaigns // 2:
            raise RuntimeError(f"only {len(lat)} of {campaigns} campaigns were still RUNNING at their Cancel")
        r.value = pct(lat, 99)
        r.met = r.value < 500.0 and late == 0
        r.details.update(p50_ms=pct(lat, 50), max_ms=max(lat), late_requests=late, late_paths=dict(late_paths),
                         campaigns_running_with_pending_at_cancel=running_at_cancel, contacts_per_campaign=per)
        if late:
            r.error = f"{late} sandbox requests arrived after CancelCampaign returned"
    finally:
        sb.configure(latency_ms=0)
        for c, _ in camps:
            cleanup(api, c.id)
        sb.reset()


# -- 8. lanes on one worker: bench/figures/lane_scale.py ----------------------------------------


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
