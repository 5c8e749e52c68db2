"""Scale-out: dispatch throughput with 1, 2 and 4 arq worker processes, and with 2 campaign_service
replicas, all against the one PostgreSQL and Redis of the stack.

Every row is a rate ratio to the 1-worker / 1-replica run measured in the same figure. The extra
workers are more `python -m dispatcher_service.worker` processes on the same queue; the second
replica is another `python -m campaign_service.server` on its own port and the same database (the
relay leader is elected by an advisory lock, so only one relays), and every worker reaches both
through `CAMPAIGN_TARGET=ipv4:127.0.0.1:p1,127.0.0.1:p2` (DeliveryClient's channel balances it with
gRPC's round_robin policy). The clients of the public API (this figure's Start and polls) still
talk to the first replica only. Each replica's CPU during the run is recorded: a replica that
served no lease is an error, not a quiet 1-replica result."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.api import seed_contacts
from bench.core import Ctx, rate_ratio
from bench.figures.prep import cleanup, settle, start_and_time
from bench.stack import Stack, cpu_seconds
from devstack.procs import ServiceProcess
from devstack.servers import free_port
from whago.campaign.v1 import resources_pb2 as res

CHIPS = 16  # lanes = chips: enough for 4 workers to share evenly
WORKERS = (1, 2, 4)
REPLICAS = (1, 2)
TARGET = 0.9  # adding processes must not cost throughput; growth past 1.0 is reported as measured


def _start_replica(st: Stack) -> ServiceProcess:
    """A second campaign_service on its own free port, same database, Redis and token."""
    port = free_port()
    env = {**st.env, "CAMPAIGN_LISTEN": f"127.0.0.1:{port}"}
    return ServiceProcess(f"campaign-replica-{int(time.time())}", "campaign_service.server", [], env, st.logs,
                          port=port).start(timeout=60)


def _start_workers(st: Stack, count: int, target: str) -> list[ServiceProcess]:
    """Restart the stack's worker with CAMPAIGN_TARGET=target, plus count-1 more on the same queue.
    Returns the extra ones (the caller stops them)."""
    st.start_worker(**{**st.worker_env, "CAMPAIGN_TARGET": target})
    extra: list[ServiceProcess] = []
    for k in range(count - 1):
        p = ServiceProcess(f"worker-extra-{k}-{int(time.time())}", "dispatcher_service.worker", [],
                           {**st.env, **st.worker_env}, st.logs).start()
        extra.append(p)
    time.sleep(1.0)
    dead = [p.name for p in extra if not p.alive()]
    if dead:
        raise RuntimeError(f"workers exited at start: {dead}")
    return extra


def _run_once(ctx: Ctx, n: int, replicas: list[ServiceProcess]) -> dict[str, Any]:
    """One campaign of n messages on CHIPS fresh chips, interval 0, camouflage off: from just before
    StartCampaign to the campaign's own complete_time."""
    st = ctx.stack
    sb = st.sandbox
    api = ctx.api()
    chips = [api.chip(st.sandbox_url) for _ in range(CHIPS)]
    camp = api.campaign(chips, name="bench scale", interval=(0.0, 0.0), camouflage=False)
    seed_contacts(st, camp.id, n)
    settle(st)
    pids = {"campaign": st.pid("campaign")} | {f"replica{i + 2}": p.proc.pid for i, p in enumerate(replicas)
                                                if p.proc is not None}
    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
    try:
        c, secs = start_and_time(api, camp.id, n)
        out: dict[str, Any] = {
            "rate": c.sent_count / secs, "seconds": round(secs, 3), "sent": c.sent_count,
            "state": res.CampaignState.Name(c.state),
            "campaign_cpu_s": {k: round(cpu_seconds(pid) - cpu0[k], 3) for k, pid in pids.items()},
        }
        if c.state != res.CAMPAIGN_STATE_COMPLETED or c.sent_count != n:
            out["error"] = f"ended {res.CampaignState.Name(c.state)} with {c.sent_count}/{n} sent"
        elif replicas:
            cpu = out["campaign_cpu_s"]
            idle = [k for k, v in cpu.items() if v < 0.1 * max(cpu.values())]
            if idle:
                out["error"] = f"replica(s) {idle} served (almost) nothing: campaign CPU {cpu}"
        return out
    finally:
        cleanup(api, camp.id)
        sb.reset()


def fig_scale(ctx: Ctx) -> None:
    n = ctx.n(10_000, 1000)
    st = ctx.stack
    st.ensure_services()
    base_env = dict(st.worker_env)
    one = st.env["CAMPAIGN_TARGET"]
    rows = {(w, r): ctx.row(f"w{w}r{r}", f"Dispatch {n} msgs, {CHIPS} chips, {w} worker process(es), "
                                         f"{r} campaign_service replica(s)", "msg/s",
                            f"rate ratio >= {TARGET} (vs 1 worker, 1 replica)")
            for r in REPLICAS for w in WORKERS}
    runs: dict[tuple[int, int], dict[str, Any]] = {}
    replicas: list[ServiceProcess] = []
    extra: list[ServiceProcess] = []
    try:
        for r in REPLICAS:
            if r == 2:
                replicas.append(_start_replica(st))
            target = one if r == 1 else "ipv4:" + ",".join(
                [one, *(f"127.0.0.1:{p.port}" for p in replicas)])
            for w in WORKERS:
                for p in extra:
                    p.stop()
                extra = _start_workers(st, w, target)
                st.sandbox.reset()
                try:
                    runs[(w, r)] = _run_once(ctx, n, replicas)
                except Exception as e:  # this row errs; the others still run
                    runs[(w, r)] = {"error": f"{type(e).__name__}: {e}"[:600]}
                runs[(w, r)]["campaign_target"] = target
    finally:
        for p in extra + replicas:
            p.stop()
        st.start_worker(**base_env)
    base = runs.get((1, 1), {}).get("rate", 0.0)
    for key, row in rows.items():
        run = runs.get(key)
        if run is None:
            continue
        row.details.update(run)
        if "rate" in run and base > 0:
            rate_ratio(row, run["rate"], base, TARGET)
        if "error" in run:
            row.error, row.met = run["error"], False
        elif base <= 0:
            row.error, row.met = "no 1-worker baseline", False
    rows[(1, 1)].details["cpus"] = os.cpu_count()
