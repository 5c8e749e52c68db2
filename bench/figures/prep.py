"""What several figures set up the same way: settled databases, startable campaigns, cleanup."""

from __future__ import annotations

import time
from datetime import UTC

import grpc

from bench.api import (
    Api,
)
from bench.core import (
    Ctx,
)
from bench.stack import Stack
from whago.campaign.v1 import resources_pb2 as res

LONG_INTERVAL = (3600.0, 3600.0)  # a startable campaign that sends (almost) nothing


def checkpoint(stack: Stack) -> None:
    """Flush dirty pages before a timed write so neither side pays for the other's checkpoint."""
    with stack.db(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CHECKPOINT")


def settle(stack: Stack) -> None:
    """Finish earlier work's database upkeep before a rate is measured: the 100k-row deletes just
    before `dispatch` otherwise had autovacuum running inside its window (PostgreSQL CPU per message
    0.126 ms in a full run vs ~0.08 ms alone), billed to ours while the baseline never touches it."""
    with stack.db(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
        cur.execute("CHECKPOINT")


def round_robin_insert(cur: object, campaign_id: str, chip_ids: list[str]) -> None:
    """The baseline of Start: one INSERT … SELECT of the campaign's messages, chips round-robin."""
    cur.execute(  # type: ignore[attr-defined]
        "INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, seq, template_index) "
        "SELECT c.campaign_id, c.id, (%s::uuid[])[((c.rn - 1) %% %s) + 1], c.rn, 0 "
        "FROM (SELECT campaign_id, id, row_number() OVER (ORDER BY row_no) AS rn "
        "      FROM campaign_contacts WHERE campaign_id = %s) c",
        (chip_ids, len(chip_ids), campaign_id))


def sql_delete_campaign(stack: Stack, campaign_id: str) -> None:
    with stack.db() as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM campaign_messages WHERE campaign_id = %s", (campaign_id,))
        cur.execute("DELETE FROM campaign_contacts WHERE campaign_id = %s", (campaign_id,))
        cur.execute("DELETE FROM campaigns WHERE id = %s", (campaign_id,))


def _wait_dequeued(stack: Stack, queue: str, campaign_id: str, timeout: float, left_sql: str,
                   left_params: tuple[object, ...]) -> float:
    """Seconds until the campaign's entry of a background queue (campaign_purges,
    campaign_cancel_sweeps) is gone; -1.0 after `timeout` or when `left_sql` still counts rows then.
    Polls the queue only: counting rows between dead index entries on every poll cost PostgreSQL
    seconds."""
    t0 = time.perf_counter()
    while stack.sql(f"SELECT count(*) FROM {queue} WHERE campaign_id = %s", (campaign_id,))[0][0]:
        if time.perf_counter() - t0 > timeout:
            return -1.0
        time.sleep(0.1)
    done = time.perf_counter() - t0
    return -1.0 if stack.sql(left_sql, left_params)[0][0] else done


def wait_purged(stack: Stack, campaign_id: str, timeout: float) -> float:
    """A deleted campaign's contacts and messages all gone (campaign_service purges a big campaign's
    rows in the background after DeleteCampaign): see _wait_dequeued."""
    return _wait_dequeued(stack, "campaign_purges", campaign_id, timeout,
                          "SELECT (SELECT count(*) FROM campaign_messages WHERE campaign_id = %s)"
                          " + (SELECT count(*) FROM campaign_contacts WHERE campaign_id = %s)",
                          (campaign_id, campaign_id))


def wait_swept(stack: Stack, campaign_id: str, timeout: float) -> float:
    """A cancelled campaign's messages all closed (a big campaign's PENDING ones are failed in the
    background after CancelCampaign): see _wait_dequeued."""
    return _wait_dequeued(stack, "campaign_cancel_sweeps", campaign_id, timeout,
                          "SELECT count(*) FROM campaign_messages WHERE campaign_id = %s AND state IN (%s, %s)",
                          (campaign_id, res.MESSAGE_STATE_PENDING, res.MESSAGE_STATE_SENDING))


def startable(ctx: Ctx, api: Api, chips: int, name: str) -> tuple[res.Campaign, list[res.Chip]]:
    """A campaign on `chips` sandbox chips with a 3600 s pace (chip and campaign), so Start
    reaches the dispatcher but lanes stay idle."""
    cl = [api.chip(ctx.stack.sandbox_url, interval=LONG_INTERVAL) for _ in range(chips)]
    return api.campaign(cl, name=name, interval=LONG_INTERVAL), cl


def cleanup(api: Api, campaign_id: str) -> None:
    """Best effort: cancel then delete a campaign of ours."""
    for op in (api.cancel, api.delete):
        try:
            op(campaign_id)
        except grpc.RpcError:
            pass


def start_and_time(api: Api, campaign_id: str, n: int) -> tuple[res.Campaign, float]:
    """StartCampaign, then wait for the end: (the final campaign, seconds from just before Start to
    the campaign's own complete_time). The end is complete_time (same host clock), not when a poll
    saw it: a 20 ms poll cost campaign_service ~1.3 ms CPU per GetCampaign (~3% of this 2-core
    machine taken from the run it measures) and still quantized the end to 20 ms."""
    t0, wall0 = time.perf_counter(), time.time()
    api.start(campaign_id)
    c = api.wait(campaign_id, lambda c: c.state in (res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED,
                                                    res.CAMPAIGN_STATE_PAUSED), timeout=max(120.0, n / 5), poll=0.25)
    observed, wall1 = time.perf_counter() - t0, time.time()
    done = c.complete_time.ToDatetime(tzinfo=UTC).timestamp() if c.HasField("complete_time") else 0.0
    return c, done - wall0 if wall0 < done <= wall1 else observed
