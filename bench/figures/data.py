"""Bulk data figures: ImportContacts, StartCampaign, DeleteCampaign, and the 1M-contact run."""

from __future__ import annotations

import time

from bench.api import (
    CONTACT_COLUMNS,
    copy_rows,
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
    sql_delete_campaign,
    startable,
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
    # campaign_contacts itself (for a scratch campaign), so both pay the same indexes and the same
    # foreign-key check per row; the difference is our work (streaming, normalization, dedup).
    api = ctx.api()
    scratch = api.campaign([], name="bench import baseline")
    checkpoint(st)
    try:
        with st.db() as conn, conn.cursor() as cur:
            t0 = time.perf_counter()
            copy_rows(cur, "campaign_contacts", CONTACT_COLUMNS,
                      ((scratch.id, d, c, f"Contact {i}", "{}", i + 1) for i, (_, d, c) in enumerate(rows)))
            conn.commit()
            base = time.perf_counter() - t0
    finally:
        st.sql("DELETE FROM campaign_contacts WHERE campaign_id = %s", (scratch.id,))
    r.baseline = base
    r.details["baseline_rows_per_s"] = n / base

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
    time_ratio(r, ours, base, 1.5)
    r.details.update(deleted_contacts=resp.deleted_contacts, deleted_messages=resp.deleted_messages,
                     revoked_jobs=resp.revoked_jobs)
    if resp.deleted_contacts != n or resp.deleted_messages != n:
        r.error, r.met = f"deleted {resp.deleted_contacts} contacts / {resp.deleted_messages} messages of {n}", False




# -- 9. 1M contacts ---------------------------------------------------------------------------------

def fig_million(ctx: Ctx) -> None:
    n = ctx.n(1_000_000, 10_000)
    start = ctx.row("start", f"StartCampaign {n} contacts completes", "s", "completes")
    delete = ctx.row("delete", f"DeleteCampaign {n} contacts + messages completes", "s", "completes")
    mem = ctx.row("rss", f"campaign_service RSS growth over Start+Cancel+Delete of {n}", "MB", "< 150 MB")
    st = ctx.stack
    api = ctx.api()
    camp, _ = startable(ctx, api, 10, "bench million")
    t_seed, _ = timed(lambda: seed_contacts(st, camp.id, n))
    start.details["seed_seconds"] = t_seed
    pid = st.pid("campaign")
    before = read_status_kb(pid, "VmRSS")
    hwm_reset = reset_hwm(pid)
    try:
        with RssSampler(pid, 0.1) as sampler:
            checkpoint(st)
            start.value, c = timed(lambda: api.start(camp.id))
            start.met = c.state == res.CAMPAIGN_STATE_RUNNING
            cancel_s, _ = timed(lambda: api.cancel(camp.id))
            delete.details["cancel_seconds"] = cancel_s
            checkpoint(st)
            delete.value, d = timed(lambda: api.delete(camp.id))
            delete.met = d.deleted_contacts == n and d.deleted_messages == n
            delete.details.update(deleted_contacts=d.deleted_contacts, deleted_messages=d.deleted_messages)
        after_hwm = read_status_kb(pid, "VmHWM")
        peak = max(after_hwm if hwm_reset else 0, sampler.peak_kb)
        mem.value = (peak - before) / 1024
        mem.met = mem.value < 150
        mem.details.update(rss_before_mb=before / 1024, vmhwm_after_mb=after_hwm / 1024,
                           sampled_peak_mb=sampler.peak_kb / 1024, hwm_was_reset=hwm_reset, samples=sampler.samples,
                           rss_after_mb=read_status_kb(pid, "VmRSS") / 1024)
    finally:
        cleanup(api, camp.id)
