"""Bulk data figures: ImportContacts, StartCampaign, DeleteCampaign, and the 1M-contact run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.api import (
    CONTACT_COLUMNS,
    Api,
    copy_buffer,
    copy_send,
    phone_rows,
    seed_contacts,
    sql_campaign,
)
from bench.core import (
    Ctx,
    RssSampler,
    time_ratio,
    timed,
)
from bench.figures.prep import (
    checkpoint,
    cleanup,
    round_robin_insert,
    settle,
    sql_delete_campaign,
    startable,
    wait_purged,
    wait_swept,
)
from bench.stack import read_status_kb, reset_hwm
from whago.campaign.v1 import resources_pb2 as res

# -- 1. ImportContacts ------------------------------------------------------------------------------

def fig_import(ctx: Ctx) -> None:
    n = ctx.n(100_000, 1000)
    r = ctx.row("", f"ImportContacts {n} rows, streamed (batches of 1000)", "s", "time ratio <= 3")
    st = ctx.stack
    rows = phone_rows(n)
    # Baseline: COPY of the same (already normalized) rows into the table ImportContacts writes,
    # campaign_contacts itself (for a scratch campaign), so both pay the same indexes; the difference
    # is our work (streaming, normalization, dedup). The COPY text is built before the timer starts:
    # ours builds its text while its COPY runs, so the baseline's limit is the COPY alone (timing the
    # build too added ~0.2 s of Python to the baseline, see baseline_buffer_build_s).
    api = ctx.api()
    scratch = api.campaign([], name="bench import baseline")
    t0 = time.perf_counter()
    buf = copy_buffer((scratch.id, d, c, f"Contact {i}", "{}", i + 1) for i, (_, d, c) in enumerate(rows))
    build = time.perf_counter() - t0
    checkpoint(st)
    try:
        with st.db() as conn, conn.cursor() as cur:
            t0 = time.perf_counter()
            copy_send(cur, "campaign_contacts", CONTACT_COLUMNS, buf)
            conn.commit()
            base = time.perf_counter() - t0
    finally:
        st.sql("DELETE FROM campaign_contacts WHERE campaign_id = %s", (scratch.id,))
    del buf
    r.baseline = base
    r.details.update(baseline_rows_per_s=n / base, baseline_buffer_build_s=build,
                     old_baseline_with_build_s=base + build)

    # Lower bound of our normalization cost: libphonenumber in this process, on a sample.
    try:
        import phonenumbers
        sample = [p for p, _, _ in rows[: min(n, 5000)]]
        t0 = time.perf_counter()
        for p in sample:
            phonenumbers.format_number(phonenumbers.parse(p, "BR"), phonenumbers.PhoneNumberFormat.E164)
        r.details["phonenumbers_cpu_s_for_all_rows_est"] = (time.perf_counter() - t0) * n / len(sample)
    except Exception as e:
        r.details["phonenumbers_probe_error"] = repr(e)

    camp = api.campaign([], name="bench import")
    typed = [p for p, _, _ in rows]
    checkpoint(st)
    ours, resp = timed(lambda: api.import_stream(camp.id, typed, 1000))
    r.details.update(imported=resp.imported_count, duplicates=resp.duplicate_count,
                     rejected=resp.rejected_count, ours_rows_per_s=n / ours)
    time_ratio(r, ours, base, 3.0)
    r.details["old_ratio_with_build"] = ours / (base + build)
    if resp.imported_count != n:
        r.error = f"imported {resp.imported_count} of {n}"
        r.met = False
    st.sql("DELETE FROM campaign_contacts WHERE campaign_id = %s", (camp.id,))
    cleanup(api, camp.id)


# -- 2. StartCampaign -------------------------------------------------------------------------------

def fig_start(ctx: Ctx) -> None:
    n = ctx.n(100_000, 1000)
    r = ctx.row("", f"StartCampaign {n} contacts on 10 chips", "s", "time ratio <= 1.5")
    st = ctx.stack
    api = ctx.api()
    camp, chips = startable(ctx, api, 10, "bench start")
    seed_contacts(st, camp.id, n)
    # Baseline: an equivalent campaign, its messages made by one INSERT … SELECT.
    uid = st.user_id_of(api.key)
    chip_ids = [c.id for c in chips]
    b = sql_campaign(st, uid, chip_ids, like=camp.id)
    seed_contacts(st, b, n)
    checkpoint(st)
    try:
        with st.db() as conn, conn.cursor() as cur:
            t0 = time.perf_counter()
            round_robin_insert(cur, b, chip_ids)
            conn.commit()
            base = time.perf_counter() - t0
    finally:
        sql_delete_campaign(st, b)
    r.baseline = base
    checkpoint(st)
    try:
        ours, c = timed(lambda: api.start(camp.id))
        time_ratio(r, ours, base, 1.5)
        msgs = st.sql("SELECT count(*), count(DISTINCT chip_id) FROM campaign_messages WHERE campaign_id = %s",
                      (camp.id,))[0]
        r.details.update(state=res.CampaignState.Name(c.state), messages=int(msgs[0]), chips_used=int(msgs[1]))
        if msgs[0] != n:
            r.error, r.met = f"{msgs[0]} messages for {n} contacts", False
    finally:
        cleanup(api, camp.id)


# -- 3. DeleteCampaign ------------------------------------------------------------------------------

def fig_delete(ctx: Ctx) -> None:
    n = ctx.n(100_000, 1000)
    r = ctx.row("", f"DeleteCampaign {n} contacts + {n} messages (after Cancel)", "s", "time ratio <= 1.5")
    st = ctx.stack
    api = ctx.api()
    camp, chips = startable(ctx, api, 10, "bench delete")
    seed_contacts(st, camp.id, n)
    api.start(camp.id)
    api.cancel(camp.id)
    # Baseline: an equivalent cancelled campaign (same rows, messages FAILED by the same UPDATE).
    uid = st.user_id_of(api.key)
    chip_ids = [c.id for c in chips]
    b = sql_campaign(st, uid, chip_ids, like=camp.id, state=res.CAMPAIGN_STATE_CANCELLED)
    seed_contacts(st, b, n)
    with st.db() as conn, conn.cursor() as cur:
        round_robin_insert(cur, b, chip_ids)
    with st.db() as conn, conn.cursor() as cur:
        cur.execute("UPDATE campaign_messages SET state = 6, failure_reason = 'cancelled by user', "
                    "updated_at = now() WHERE campaign_id = %s", (b,))
    checkpoint(st)
    with st.db() as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        cur.execute("DELETE FROM campaign_messages WHERE campaign_id = %s", (b,))
        cur.execute("DELETE FROM campaign_contacts WHERE campaign_id = %s", (b,))
        cur.execute("DELETE FROM campaigns WHERE id = %s", (b,))
        conn.commit()
        base = time.perf_counter() - t0
    r.baseline = base
    checkpoint(st)
    ours, resp = timed(lambda: api.delete(camp.id))
    # A campaign this big has its rows purged after the RPC (campaign_service/sweeps.py): how long
    # that took, next to the baseline's synchronous deletes of the same rows.
    purge = wait_purged(st, camp.id, timeout=600.0)
    time_ratio(r, ours, base, 1.5)
    r.details.update(deleted_contacts=resp.deleted_contacts, deleted_messages=resp.deleted_messages,
                     revoked_jobs=resp.revoked_jobs, purge_after_rpc_s=purge,
                     rpc_plus_purge_ratio=(ours + purge) / base if purge >= 0 else None)
    if resp.deleted_contacts != n or resp.deleted_messages != n:
        r.error, r.met = f"deleted {resp.deleted_contacts} contacts / {resp.deleted_messages} messages of {n}", False
    elif purge < 0:
        r.error, r.met = "the campaign's rows were not all purged within 600 s", False




# -- 9. 1M contacts ---------------------------------------------------------------------------------

def fig_million(ctx: Ctx) -> None:
    """Start, Cancel and Delete of a big campaign at two sizes (100k, then 1M): the rows hold the big
    one, their details both and how each figure grew (`growth`: big / small)."""
    n = ctx.n(1_000_000, 10_000)
    small = ctx.n(100_000, 1000)
    start = ctx.row("start", f"StartCampaign {n} contacts", "s", "<= 10 s")
    cancel = ctx.row("cancel", f"CancelCampaign {n} messages (all but the lanes' first sends open)", "s", "<= 2 s")
    delete = ctx.row("delete", f"DeleteCampaign {n} contacts + messages (after Cancel)", "s", "<= 2 s")
    mem = ctx.row("rss", f"campaign_service RSS growth over Start+Cancel+Delete of {n}", "MB", "< 150 MB")
    api = ctx.api()
    runs = {size: _million_run(ctx, api, size) for size in dict.fromkeys((small, n))}
    big = runs[n]
    start.value, start.met, start.error = big.start_s, big.start_ok and big.start_s <= 10.0, big.start_error
    start.baseline, start.ratio_kind = big.one_statement_s, "time ours/one INSERT ... SELECT (reference)"
    start.ratio = big.start_s / big.one_statement_s if big.one_statement_s > 0 else None
    cancel.value, cancel.error = big.cancel_s, big.cancel_error
    cancel.met = not big.cancel_error and big.cancel_s <= 2.0
    delete.value = big.delete_s
    delete.met = not big.delete_error and big.delete_s <= 2.0
    delete.error = big.delete_error
    mem.value, mem.met = big.rss_growth_mb, big.rss_growth_mb < 150
    sizes = {f"{size}": vars(run) for size, run in runs.items()}
    start.details["settings"] = {k: os.environ.get(k, "default") for k in (
        "WHAGO_START_PARALLEL", "WHAGO_START_PARALLEL_MIN", "WHAGO_DELETE_INLINE_ROWS", "WHAGO_CANCEL_INLINE_ROWS")}
    for row, key in ((start, "start_s"), (cancel, "cancel_s"), (delete, "delete_s"), (mem, "rss_growth_mb")):
        row.details["runs"] = sizes
        if small != n and getattr(runs[small], key) > 0:
            row.details["growth"] = {"contacts": n / small, key: getattr(big, key) / getattr(runs[small], key)}


@dataclass
class _MillionRun:
    contacts: int
    seed_s: float = 0.0
    one_statement_s: float = 0.0  # the same messages by one INSERT ... SELECT (rolled back)
    start_s: float = 0.0
    start_ok: bool = False
    start_error: str | None = None
    cancel_s: float = 0.0
    sweep_s: float = 0.0  # from Cancel's return until its PENDING messages were all FAILED (background sweep)
    cancel_error: str | None = None
    delete_s: float = 0.0
    deleted_contacts: int = 0
    deleted_messages: int = 0
    not_found_after_delete: bool = False
    purge_s: float = 0.0  # from Delete's return until the last row was gone (background purge)
    delete_error: str | None = None
    rss_before_mb: float = 0.0
    rss_growth_mb: float = 0.0
    rss_detail: dict[str, Any] = field(default_factory=dict)


def _million_run(ctx: Ctx, api: Api, n: int) -> _MillionRun:
    st = ctx.stack
    out = _MillionRun(n)
    settle(st)  # the previous run's purge leaves dead rows: vacuumed before, not during, this run
    camp, chips = startable(ctx, api, 10, f"bench million {n}")
    out.seed_s, _ = timed(lambda: seed_contacts(st, camp.id, n))
    # Reference in the same run (the machine is shared): the `start` figure's baseline, one
    # INSERT ... SELECT of the same messages, rolled back (and vacuumed away before ours).
    checkpoint(st)
    with st.db() as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        round_robin_insert(cur, camp.id, [ch.id for ch in chips])
        out.one_statement_s = time.perf_counter() - t0
        conn.rollback()
    settle(st)
    pid = st.pid("campaign")
    before = read_status_kb(pid, "VmRSS")
    hwm_reset = reset_hwm(pid)
    deleted = False
    try:
        with RssSampler(pid, 0.1) as sampler:
            checkpoint(st)
            out.start_s, c = timed(lambda: api.start(camp.id))
            out.start_ok = c.state == res.CAMPAIGN_STATE_RUNNING
            if not out.start_ok:
                out.start_error = f"state {res.CampaignState.Name(c.state)} after Start"
            msgs = st.sql("SELECT count(*) FROM campaign_messages WHERE campaign_id = %s", (camp.id,))[0][0]
            if msgs != n:
                out.start_ok, out.start_error = False, f"{msgs} messages for {n} contacts"
            out.cancel_s, cancelled = timed(lambda: api.cancel(camp.id))
            out.sweep_s = wait_swept(st, camp.id, timeout=600.0)
            # The lanes' first sends (one per chip, paced at 3600 s) may leave before the Cancel.
            if cancelled.state != res.CAMPAIGN_STATE_CANCELLED or cancelled.failed_count + cancelled.sent_count != n:
                out.cancel_error = (f"{res.CampaignState.Name(cancelled.state)} with {cancelled.failed_count} failed"
                                    f" + {cancelled.sent_count} sent of {n} after Cancel")
            elif out.sweep_s < 0:
                out.cancel_error = "messages still open 600 s after Cancel"
            checkpoint(st)
            out.delete_s, d = timed(lambda: api.delete(camp.id))
            deleted = True
            out.deleted_contacts, out.deleted_messages = d.deleted_contacts, d.deleted_messages
            out.not_found_after_delete = _not_found(api, camp.id)
            out.purge_s = wait_purged(st, camp.id, timeout=600.0)
        problems = []
        if (d.deleted_contacts, d.deleted_messages) != (n, n):
            problems.append(f"deleted {d.deleted_contacts} contacts / {d.deleted_messages} messages of {n}")
        if not out.not_found_after_delete:
            problems.append("GetCampaign still found the campaign after DeleteCampaign returned")
        if out.purge_s < 0:
            problems.append("its rows were not all purged within 600 s")
        out.delete_error = "; ".join(problems) or None
        after_hwm = read_status_kb(pid, "VmHWM")
        peak = max(after_hwm if hwm_reset else 0, sampler.peak_kb)
        out.rss_before_mb, out.rss_growth_mb = before / 1024, (peak - before) / 1024
        out.rss_detail = {"vmhwm_after_mb": after_hwm / 1024, "sampled_peak_mb": sampler.peak_kb / 1024,
                          "hwm_was_reset": hwm_reset, "samples": sampler.samples,
                          "rss_after_mb": read_status_kb(pid, "VmRSS") / 1024}
    finally:
        if not deleted:
            cleanup(api, camp.id)
            wait_purged(st, camp.id, timeout=600.0)
    return out


def _not_found(api: Api, campaign_id: str) -> bool:
    try:
        api.get(campaign_id)
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.NOT_FOUND
    return False
