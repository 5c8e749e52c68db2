"""Read figures: GetCampaign QPS against a trivial servicer, ListCampaigns latency at 100k rows."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import grpc

from bench.api import (
    Metadata,
    seed_contacts,
)
from bench.core import (
    Ctx,
    PySpy,
    pct,
    rate_ratio,
)
from bench.figures.prep import (
    settle,
)
from campaign_service import config as campaign_config
from devstack.procs import REPO, service_env
from devstack.servers import free_port, wait_port
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc

# -- 5. GetCampaign QPS -----------------------------------------------------------------------------

def _qps(target: str, request: cs.GetCampaignRequest, md: Metadata | None, threads: int,
         seconds: float) -> tuple[float, int, int]:
    """`threads` client threads, each with its own stub on one shared channel, calling
    GetCampaign for `seconds` (after a short warm-up). Returns (QPS, calls, errors)."""
    ch = grpc.insecure_channel(target)
    grpc.channel_ready_future(ch).result(timeout=30)
    counts = [0] * threads
    errors = [0] * threads
    start = threading.Event()
    stop = threading.Event()

    def run(k: int) -> None:
        stub = cs_grpc.CampaignServiceStub(ch)
        start.wait()
        while not stop.is_set():
            try:
                stub.GetCampaign(request, metadata=md, timeout=10)
                counts[k] += 1
            except grpc.RpcError:
                errors[k] += 1

    try:
        stub = cs_grpc.CampaignServiceStub(ch)
        for _ in range(20):  # warm-up
            stub.GetCampaign(request, metadata=md, timeout=10)
        ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
        for t in ts:
            t.start()
        t0 = time.perf_counter()
        start.set()
        time.sleep(seconds)
        stop.set()
        for t in ts:
            t.join(timeout=15)
        elapsed = time.perf_counter() - t0
        return sum(counts) / elapsed, sum(counts), sum(errors)
    finally:
        ch.close()


def fig_get(ctx: Ctx) -> None:
    threads = 16
    seconds = 5.0 if ctx.scale >= 0.5 else 2.0
    r = ctx.row("", f"GetCampaign QPS, {threads} client threads, {seconds:.0f} s x2", "QPS", "rate ratio >= 0.5")
    st = ctx.stack
    settle(st)  # the dispatch runs just before leave ~40k dead message rows for autovacuum
    defaults = campaign_config.load()
    workers = int(st.env.get("CAMPAIGN_MAX_WORKERS", str(defaults.max_workers)))
    core = int(st.env.get("CAMPAIGN_CORE_WORKERS", str(defaults.core_workers)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.trivial_server", "--port", str(port),
                             "--max-workers", str(workers),
                             "--core-workers", str(core)], env=service_env({}), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, 30)
        base_target = f"127.0.0.1:{port}"
        probe = cs.GetCampaignRequest(campaign_id=str(uuid.uuid4()))
        base_q = [_qps(base_target, probe, None, threads, seconds / 2)[0]]
        r.baseline = base_q[0]
        api = ctx.api()
        camp = api.campaign([api.chip(st.sandbox_url)], name="bench get")
        seed_contacts(st, camp.id, 10)
        req = cs.GetCampaignRequest(campaign_id=camp.id)
        ours_q: list[float] = []
        errs = 0
        cpu: dict[str, float] = {}
        calls = 0
        for k in range(2):  # alternate with the baseline to share the machine's noise
            cpu0, client0 = st.cpu(), time.process_time()
            with PySpy(st.pid("campaign"), seconds / 2, str(st.workdir / f"pyspy-get-{k}.txt")) as spy:
                q, n, e = _qps(f"127.0.0.1:{st.ports['campaign']}", req, api.md, threads, seconds / 2)
            cpu1, client1 = st.cpu(), time.process_time()
            for name, v in cpu1.items():
                cpu[name] = cpu.get(name, 0.0) + v - cpu0.get(name, 0.0)
            cpu["client (bench)"] = cpu.get("client (bench)", 0.0) + client1 - client0
            calls += n
            if k == 0 and spy.summary():
                r.details["pyspy_campaign_service"] = spy.summary()
            ours_q.append(q)
            errs += e
            if k == 0:
                base_q.append(_qps(base_target, probe, None, threads, seconds / 2)[0])
        # Where the CPU went per call during our runs (ms): tells the server's cost from the rest.
        r.details["cpu_ms_per_call"] = {k: round(v * 1000 / max(1, calls), 4) for k, v in cpu.items()}
        rate_ratio(r, sum(ours_q) / len(ours_q), sum(base_q) / len(base_q), 0.5)
        r.details.update(ours_runs=ours_q, baseline_runs=base_q, errors=errs, server_max_workers=workers,
                         server_core_workers=core)
        if errs:
            r.error = f"{errs} RPC errors"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- 6. ListCampaigns -------------------------------------------------------------------------------

def fig_list(ctx: Ctx) -> None:
    n = ctx.n(100_000, 2000)
    r = ctx.row("", f"ListCampaigns page of 100, {n} campaigns of one user: p99", "ms", "p99 < 20 ms")
    st = ctx.stack
    api = ctx.api()
    like = api.campaign([api.chip(st.sandbox_url)], name="bench list template")
    uid = st.user_id_of(api.key)
    with st.db() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO campaigns (id, user_id, name, description, state, templates, settings, chip_ids, "
            "created_at, updated_at, total_contacts, pending_count, sent_count) "
            "SELECT gen_random_uuid(), c.user_id, 'bench list ' || i, c.description, 1 + (i %% 6), c.templates, "
            "c.settings, c.chip_ids, now() - i * interval '1 second', now() - i * interval '1 second', "
            "i %% 5000, i %% 300, i %% 4000 FROM campaigns c, generate_series(1, %s) AS i WHERE c.id = %s",
            (n - 1, like.id))
    with st.db(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE campaigns")
    try:
        first: list[float] = []
        deep: list[float] = []
        all_ms: list[float] = []
        req = cs.ListCampaignsRequest(page_size=100)
        for _ in range(10):  # warm-up
            api.campaigns.ListCampaigns(req, metadata=api.md, timeout=30)
        deadline = time.monotonic() + 90
        for _ in range(100):
            t0 = time.perf_counter()
            api.campaigns.ListCampaigns(req, metadata=api.md, timeout=30)
            first.append((time.perf_counter() - t0) * 1000)
        token, pages, seen = "", 0, 0
        while pages < 1000 and time.monotonic() < deadline:
            t0 = time.perf_counter()
            resp = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=100, page_token=token),
                                               metadata=api.md, timeout=30)
            ms = (time.perf_counter() - t0) * 1000
            pages += 1
            seen += len(resp.campaigns)
            (deep if pages > 10 else all_ms).append(ms)
            token = resp.next_page_token
            if not token:
                break
        all_ms += first + deep
        r.value = pct(all_ms, 99)
        r.met = r.value < 20.0
        r.details.update(calls=len(all_ms), p50_ms=pct(all_ms, 50), first_page_p50_ms=pct(first, 50),
                         first_page_p99_ms=pct(first, 99), deep_pages_p50_ms=pct(deep, 50),
                         deep_pages_p99_ms=pct(deep, 99), pages_walked=pages, rows_seen=seen, max_ms=max(all_ms))
        if pages < 1000 and token:
            r.details["note"] = "walk stopped by the 90 s bound"
        elif not token and seen != n:
            r.error, r.met = f"walked {seen} campaigns of {n}", False
    finally:
        st.sql("DELETE FROM campaigns WHERE user_id = %s AND name LIKE 'bench list %%' "
               "AND NOT EXISTS (SELECT 1 FROM campaign_contacts WHERE campaign_id = campaigns.id) RETURNING 1",
               (str(uid),))
