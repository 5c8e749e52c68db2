"""Crash recovery in seconds: every worker supervises the lanes' heartbeats and takes over a lane
whose owner went silent.

A running slice holds its lane lock under a short TTL (DISPATCH_LANE_LOCK_TTL, 6 s) and renews it
every quarter of that; each acquire/renew also writes the expiry into `whago:lanebeats:{queue}`
(lane_lock*.lua). A clean end removes the lane from there (lane_unlock.lua). So a member whose
expiry passed while its lock is gone is a lane whose owner died (SIGKILL, OOM, host lost) or is
cut off (long pause, partition) in the middle of a slice. arq would re-run that job only after
its job timeout (DISPATCH_JOB_TIMEOUT + 10 s); instead the first supervisor to see it claims it
(lane_takeover_claim.lua, atomic) and enqueues a new slice of the current epoch (a fresh job id:
the INCR in Store.enqueue_lanes), which wakes an idle worker at once.

Fencing: the new slice's lock writes its own token into the lane hash's `owner`, and every
request a lane lets leave passes fence_ok (fence still run:epoch AND owner still ours) in the
same Lua step that takes the send. A stale owner that comes back is refused at its next request
and stops (its heartbeat also finds the lock gone) without releasing what it held (the new
owner may have retaken it). The new owner sends the lane's PENDING messages at once; the dead
owner's leased messages (it wrote `lease_until` and its job id ahead of each lease) are retaken
one WAHA timeout + 2 s after the fence, when nothing it let leave can still be in the air
(LeaseMessages.reclaim_owners; lane/loop.py `_took_over`), rather than when their leases end.
Each carries its recorded WAHA id and is looked up before any resend, so a send that did leave
is never repeated. A slice that ends leaving its own uncertain sends leased lists itself the
same way (`_reclaim_own`): its next slice looks them up one WAHA timeout + 2 s later.

The campaign service's watchdog (kick_stalled) stays the slower backstop (e.g. every worker dead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from dispatcher_service import keys, metrics, scripts
from dispatcher_service.store import Store, aw

log = logging.getLogger("dispatcher.takeover")
SCAN_BATCH = 100


class Supervisor:
    """Scans the heartbeat zset of one queue and enqueues takeover slices for silent lanes."""

    def __init__(self, store: Store, lock_ttl: float, scan_every: float,
                 local: Callable[[str], bool] = lambda member: False) -> None:
        self.store = store
        # A lane a slice of this very process still beats for lapsed because our event loop was
        # late (10,000 lanes ending together): it is not taken over from ourselves; the heartbeat's
        # next round takes the lock back (lock_renew.lua) unless someone else took the lane.
        self.local = local
        self.redis = store.redis
        self.beats = keys.lane_beats(store.queue)
        self.scan_every = scan_every
        # A claimed lane is not claimed again for this long: enough for its takeover slice to
        # start and beat; if it never does (every worker busy or gone), it is claimed again.
        self.hold_ms = int(max(5.0, 2 * lock_ttl) * 1000)
        self._claim = scripts.register(self.redis, "lane_takeover_claim")

    async def scan(self) -> list[str]:
        """One pass: claim every lane whose heartbeat lapsed; returns the job ids enqueued."""
        now_ms = int(time.time() * 1000)
        stale = await self.redis.zrangebyscore(self.beats, "-inf", now_ms, start=0, num=SCAN_BATCH)
        out: list[str] = []
        for raw in stale:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            if self.local(member):
                continue
            campaign_id, _, chip_id = member.partition(":")
            r = int(await self._claim(keys=[self.beats, keys.lane_lock(campaign_id, chip_id)],
                                      args=[member, self.hold_ms]))
            if r != 1:
                continue
            f = await self.store.fences.get(campaign_id)
            spec = await self.store.load_lane_spec(campaign_id, chip_id)
            if f.mode != "run" or spec is None:  # stopped or gone meanwhile: nothing to take over
                await aw(self.redis.zrem(self.beats, member))
                continue
            jid = await self.store.enqueue_lane(campaign_id, chip_id, f.epoch)
            log.warning("lane %s:%s epoch=%d: owner's heartbeat stopped; takeover slice %s enqueued",
                        campaign_id, chip_id, f.epoch, jid)
            if jid:
                metrics.TAKEOVERS.inc()
                out.append(jid)
        return out

    async def run(self) -> None:
        """Scan for the worker's life (bounded loop; Redis errors are waited out)."""
        for _ in range(1_000_000_000):
            await asyncio.sleep(self.scan_every)
            try:
                await self.scan()
            except (RedisError, OSError) as e:
                log.debug("takeover scan: %s: %s", type(e).__name__, e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let the supervisor die: the next scan tries again
                log.warning("takeover scan failed: %s: %s", type(e).__name__, e)
