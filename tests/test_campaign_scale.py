# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""Scale: 100k contacts import and start correctly (one INSERT ... SELECT, round-robin), and
ListCampaigns pages correctly through 100k campaigns. Timings are printed (pytest -s) for a look;
the speed targets themselves are checked by `make bench`, as ratios, not by timed tests."""

from __future__ import annotations

import io
import time

import sqlalchemy as sa

from tests.helpers import Api, phones, user_id
from tests.test_campaign_support import api, draft, engine, live, slow_chip  # noqa: F401
from whago.campaign.v1 import campaign_service_pb2 as cs

N = 100_000


def test_import_and_start_100k_contacts(api: Api, engine: sa.Engine, live: str) -> None:
    chips = [slow_chip(api, live) for _ in range(3)]
    c = draft(api, chips)
    nums = phones(N)
    t0 = time.perf_counter()
    r = api.import_phones(c.id, nums, batch=5000)
    t_import = time.perf_counter() - t0
    assert r.imported_count == N

    # the same rows through a plain COPY into campaign_contacts (of a scratch campaign), no normalization
    scratch = draft(api)
    buf = io.StringIO("".join(f"{scratch.id}\t{p.replace(' ', '')[1:]}\t{p}@c.us\tContact {i}\t{{}}\t{i}\n"
                              for i, p in enumerate(nums)))
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        t0 = time.perf_counter()
        cur.copy_expert("COPY campaign_contacts (campaign_id, phone, chat_id, name, variables, row_no) FROM STDIN",
                        buf)
        raw.commit()
        t_copy = time.perf_counter() - t0
        cur.execute("DELETE FROM campaign_contacts WHERE campaign_id = %s", (scratch.id,))
        raw.commit()
    finally:
        raw.close()

    t0 = time.perf_counter()
    started = api.start(c.id)
    t_start = time.perf_counter() - t0
    print(f"\nimport {N}: {t_import:.2f}s (plain COPY {t_copy:.2f}s, ratio {t_import / t_copy:.1f}); "
          f"start {N}: {t_start:.2f}s")
    assert started.pending_count + started.sent_count + started.failed_count == N
    with engine.connect() as conn:
        per_chip = conn.execute(sa.text("SELECT count(*) FROM campaign_messages WHERE campaign_id = :c"
                                        " GROUP BY chip_id ORDER BY 1"), {"c": c.id}).scalars().all()
    assert per_chip == [N // 3, N // 3 + 1, N // 3 + 1] or per_chip == [33333, 33333, 33334]
    api.cancel(c.id)


def test_list_campaigns_pages_through_100k_campaigns(api: Api, engine: sa.Engine, api_key: str) -> None:
    uid = user_id(engine, api_key)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO campaigns (id, user_id, name, state, created_at, templates, settings)"
                             " SELECT gen_random_uuid(), :u, 'bulk ' || g, (ARRAY[1, 5, 6])[1 + g % 3],"
                             " now() - g * interval '1 second', '[{\"text\": \"hi {{name}}\"}]'::jsonb,"
                             " '{\"pacing\": {\"intervalMinSeconds\": 40}}'::jsonb"
                             " FROM generate_series(1, :n) g"), {"u": uid, "n": N})
        conn.execute(sa.text("ANALYZE campaigns"))
    token = ""
    times: list[float] = []
    seen: set[str] = set()
    last_created = None
    for _ in range(300):
        t0 = time.perf_counter()
        r = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=100, page_token=token), metadata=api.md)
        times.append(time.perf_counter() - t0)
        assert len(r.campaigns) == 100
        for c in r.campaigns:
            assert c.id not in seen, "a campaign appeared on two pages"
            seen.add(c.id)
            created = c.create_time.ToDatetime()
            assert last_created is None or created <= last_created, "pages are not newest first"
            last_created = created
        token = r.next_page_token
        assert token
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    t_state = []
    for _ in range(50):
        t0 = time.perf_counter()
        cancelled = api.campaigns.ListCampaigns(cs.ListCampaignsRequest(page_size=100, state=5), metadata=api.md)
        t_state.append(time.perf_counter() - t0)
        assert len(cancelled.campaigns) == 100 and all(c.state == 5 for c in cancelled.campaigns)
    print(f"\nListCampaigns page of 100 over {N}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
          f"state filter p50 {sorted(t_state)[25] * 1000:.1f} ms")
    with engine.begin() as conn:  # leave the shared database as small as we found it
        conn.execute(sa.text("DELETE FROM campaigns WHERE user_id = :u AND name LIKE 'bulk %'"), {"u": uid})
