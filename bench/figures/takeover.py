"""Crash recovery: how long a SIGKILLed worker's lane stays silent before another worker takes it
over (dispatcher_service/takeover.py), over 10 kills; and that nobody got a message twice."""

from __future__ import annotations

import collections
import time
from typing import Any

import redis as redis_sync

from bench.api import seed_contacts
from bench.core import Ctx, pct
from devstack.procs import ServiceProcess
from dispatcher_service import keys

KILLS = 10
TARGET_S = 15.0
SETTLE_S = 0.5  # a send already in the air when the owner died may land just after the kill


def _owner_pid(r: redis_sync.Redis, campaign_id: str, chip_id: str, timeout: float = 20.0) -> int:
    """The pid of the worker process holding the lane (its lock token is job/pid-nonce)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        raw: Any = r.hget(keys.lane(campaign_id, chip_id), "owner")
        if raw:
            owner = raw.decode() if isinstance(raw, bytes) else str(raw)
            return int(owner.rsplit("/", 1)[1].split("-", 1)[0])
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError("the lane never got an owner")


def fig_takeover(ctx: Ctx) -> None:
    kills = KILLS
    r = ctx.row("", f"Takeover after SIGKILL of a lane's worker ({kills} kills, 2 workers): p99 until the "
                    "lane sends again", "s", f"p99 < {TARGET_S:.0f} s, 0 duplicates")
    st = ctx.stack
    api = ctx.api()
    rd = redis_sync.Redis.from_url(st.env["REDIS_URL"])
    # Job timeout 300 s: arq itself would re-run a dead worker's job only after 310 s.
    env = {**st.env, **st.worker_env, "DISPATCH_JOB_TIMEOUT": "300", "WHAGO_LOG_LEVEL": "INFO"}
    workers: list[ServiceProcess] = []
    samples: list[float] = []
    dup = 0
    per_round: list[dict[str, float]] = []
    try:
        st.procs.pop("worker").stop()  # the figure runs its own workers
        for k in range(2):
            workers.append(ServiceProcess(f"worker-takeover-{k}-{int(time.time())}", "dispatcher_service.worker",
                                          [], env, st.logs).start())
        for w in workers:
            w.wait_logged(" started: ", timeout=30)
        for k in range(kills):
            chip = api.chip(st.sandbox_url, interval=(0.05, 0.1))
            c = api.campaign([chip], name=f"bench takeover {k}", interval=(0.05, 0.1), camouflage=False)
            seed_contacts(st, c.id, 2000)
            api.start(c.id)
            api.wait(c.id, lambda x: x.sent_count >= 5, timeout=60)
            pid = _owner_pid(rd, c.id, chip.id)
            victim = next(w for w in workers if w.proc is not None and w.proc.pid == pid)
            t_kill = time.time()
            victim.kill()
            workers.remove(victim)
            spare = ServiceProcess(f"worker-takeover-{k + 2}-{int(time.time())}", "dispatcher_service.worker",
                                   [], env, st.logs).start()  # the next round's standby, started meanwhile
            took = float("inf")
            deadline = time.monotonic() + 60
            for _ in range(1200):
                later = st.sandbox.sends(session=chip.waha_session, since=t_kill + SETTLE_S)
                if later:
                    took = min(s["ts"] for s in later) - t_kill
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            api.cancel(c.id)
            counted = collections.Counter(s["chat_id"] for s in st.sandbox.sends(session=chip.waha_session))
            dup += sum(v - 1 for v in counted.values() if v > 1)
            samples.append(took)
            per_round.append({"resumed_s": round(took, 3), "sent": float(sum(counted.values()))})
            spare.wait_logged(" started: ", timeout=30)
            workers.append(spare)
    finally:
        for w in workers:
            w.stop()
        rd.close()
        st.start_worker(**st.worker_env)
    finite = [s for s in samples if s != float("inf")]
    r.details.update({"kills": len(samples), "p50_s": pct(finite, 50) if finite else None,
                      "p99_s": pct(finite, 99) if finite else None, "max_s": max(samples) if samples else None,
                      "duplicates": dup, "rounds": per_round,
                      "lane_lock_ttl_s": 6.0, "takeover_scan_s": 1.0})
    if len(finite) < len(samples) or not finite:
        r.error, r.met = f"{len(samples) - len(finite)} of {len(samples)} lanes never sent again within 60 s", False
        return
    r.value = pct(finite, 99)
    r.met = r.value < TARGET_S and dup == 0 and len(samples) == kills
