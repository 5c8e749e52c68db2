"""Lane figures: lease+report throughput (lanes on one worker: lane_scale.py; Cancel/Pause: stop.py)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

from bench.api import (
    seed_contacts,
    sql_campaign,
)
from bench.core import (
    Ctx,
)
from bench.figures.prep import (
    LONG_INTERVAL,
    settle,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as res

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
