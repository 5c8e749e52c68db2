# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""settings.shuffle_contacts: Start sends in a random order instead of import order, still one
message per contact and still round-robin over the chips."""

from __future__ import annotations

import collections

import sqlalchemy as sa

from tests.helpers import Api, phones
from tests.test_campaign_support import api, engine, live, slow_chip  # noqa: F401
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res


def _send_order(engine: sa.Engine, campaign_id: str) -> list[int]:
    """Import row numbers of the contacts, in the order their messages will be sent (seq)."""
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT c.row_no FROM campaign_messages m JOIN campaign_contacts c ON c.id = m.contact_id"
            " WHERE m.campaign_id = :c ORDER BY m.seq"), {"c": campaign_id}).scalars())


def _started(api: Api, live: str, shuffle: bool) -> tuple[str, list[res.Chip]]:
    chips = [slow_chip(api, live) for _ in range(3)]
    settings = res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=3600, interval_max_seconds=3600),
                                    shuffle_contacts=shuffle)
    camp = api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name=f"shuffle={shuffle}", templates=[res.MessageTemplate(text="hi")], settings=settings,
        chip_ids=[c.id for c in chips])), metadata=api.md)
    api.import_phones(camp.id, phones(300))
    api.start(camp.id)
    return camp.id, chips


def test_shuffle_sends_in_random_order_once_each_round_robin(api: Api, engine: sa.Engine, live: str) -> None:
    cid, _ = _started(api, live, shuffle=True)
    order = _send_order(engine, cid)
    assert sorted(order) == list(range(1, 301))
    assert order != sorted(order)
    with engine.connect() as conn:
        per_chip = collections.Counter(conn.execute(sa.text(
            "SELECT chip_id FROM campaign_messages WHERE campaign_id = :c"), {"c": cid}).scalars())
    assert sorted(per_chip.values()) == [100, 100, 100]
    api.cancel(cid)


def test_without_shuffle_sends_in_import_order(api: Api, engine: sa.Engine, live: str) -> None:
    cid, _ = _started(api, live, shuffle=False)
    assert _send_order(engine, cid) == list(range(1, 301))
    api.cancel(cid)
