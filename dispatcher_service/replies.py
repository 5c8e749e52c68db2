"""Opt-out confirmation replies: when campaign_service applies an opt-out of a user who set a
confirmation text, ReportInboundMessages answers an OptOutReply, which the webhook receiver
enqueues as an arq job (Store.enqueue_replies: `send_reply`, one job id per opt-out). A worker sends it through the chip
that received the opt-out, in a send slot of that chip's own pacing (minimum gap, caps, window,
warm-up), so a reply is paced like any message of the chip.

At most once: a WAHA timeout or error is not retried, and a marker set just before the send keeps
a job re-run after a crash from sending again (a crash between the two loses the reply: a second
"you are unsubscribed" is worse than none). A slot far ahead is given back and the job deferred to
it (arq Retry), so no job sleeps through its timeout."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq import Retry

from dispatcher_service import keys
from dispatcher_service.lane.common import WorkerEnv
from dispatcher_service.pacing import Limits
from dispatcher_service.store import aw
from dispatcher_service.waha.client import WahaClient, WahaError
from whago.campaign.v1 import delivery_service_pb2 as dpb

log = logging.getLogger("dispatcher.replies")

#: A reply whose slot is further ahead than this gives it back and comes again then.
MAX_WAIT_SECONDS = 5.0
SENT_MARKER_TTL = 7 * 86_400


async def send_reply(ctx: dict[str, Any], raw: bytes) -> str:
    """The arq job: a slot of the chip, then one sendText; returns what happened (arq keeps it)."""
    env: WorkerEnv = ctx["env"]
    r = dpb.OptOutReply.FromString(raw)
    limits = Limits.from_proto(r.pacing if r.HasField("pacing") else None)
    slot = await env.pacer.reserve(r.chip_id, limits)
    if slot is None:
        log.info("reply %s: the chip has no sending window ahead; not sent", r.reply_id)
        return "no window"
    wait = slot.slot - time.time()
    if wait > MAX_WAIT_SECONDS:
        await env.pacer.release(slot)
        raise Retry(defer=wait)
    await asyncio.sleep(max(0.0, wait))
    if not await aw(env.redis.set(keys.reply_sent(r.chip_id, r.reply_id), "1", nx=True, ex=SENT_MARKER_TTL)):
        return "already sent"
    waha = WahaClient(env.http, r.waha_base_url, r.waha_api_key, env.cfg.waha_timeout, allowed_hosts=env.cfg.waha_hosts)
    try:
        await waha.send_text(r.waha_session, r.chat_id, r.text)
    except WahaError as e:
        log.warning("reply %s to %s not sent (not retried): %s", r.reply_id, r.chat_id, e)
        return f"failed: {e}"[:300]
    log.info("reply %s sent to %s by chip %s", r.reply_id, r.chat_id, r.chip_id)
    return "sent"
