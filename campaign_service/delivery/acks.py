"""ReportAcks: WhatsApp receipts (WAHA `message.ack`) move sent messages to DELIVERED, then READ.

A receipt names the message by its WAHA id: serialized ("true_<chat>_<id>", as webhooks give it)
or bare. A message holds one or the other (the id chosen before the send, replaced by the one WAHA
answered with), so both forms are looked up, through the partial index on waha_message_id
(migration 0005). Found messages are applied per campaign through `reports` (same transitions and
counters as a lane's DELIVERED/READ reports: never backwards, the truth wins over FAILED).
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import text

from campaign_service import errors
from campaign_service.db import arrays
from campaign_service.db.engine import Database
from campaign_service.delivery import reports
from campaign_service.delivery.leases import MAX_WAHA_ID_LENGTH

MAX_ACKS = 1000
_SERIALIZED = re.compile(r"^(?:true|false)_[^_]+_(?P<id>[^_]+)")

_FIND = text("SELECT id, campaign_id, waha_message_id FROM campaign_messages"
             " WHERE waha_message_id = ANY(CAST(:ids AS text[]))")


class Ack(NamedTuple):
    waha_message_id: str
    outcome: int
    time: datetime | None = None


@dataclass(frozen=True)
class AckResult:
    matched: int
    unmatched: int


def _forms(waha_id: str) -> tuple[str, ...]:
    m = _SERIALIZED.match(waha_id)
    return (waha_id, m.group("id")) if m else (waha_id,)


def validate(acks: list[Ack]) -> None:
    violations: list[tuple[str, str]] = []
    if len(acks) > MAX_ACKS:
        violations.append(("acks", f"at most {MAX_ACKS} per call"))
    for i, a in enumerate(acks):
        if a.outcome not in (reports.DELIVERED, reports.READ):
            violations.append((f"acks[{i}].outcome", "must be DELIVERED or READ"))
        if not 1 <= len(a.waha_message_id) <= MAX_WAHA_ID_LENGTH:
            violations.append((f"acks[{i}].waha_message_id", f"must be 1-{MAX_WAHA_ID_LENGTH} characters"))
    if violations:
        raise errors.InvalidArgument(violations)


def report_acks(db: Database, acks: list[Ack]) -> AckResult:
    """Apply the receipts; one transaction per campaign they touch."""
    validate(acks)
    if not acks:
        return AckResult(0, 0)
    with db.session() as s:
        rows = s.execute(_FIND, {"ids": arrays.literal(sorted({f for a in acks for f in _forms(a.waha_message_id)}))})
        by_id: dict[str, tuple[uuid.UUID, int]] = {r.waha_message_id: (r.campaign_id, r.id) for r in rows}
    per_campaign: dict[uuid.UUID, list[reports.Report]] = defaultdict(list)
    matched = 0
    for a in acks:
        hit = next((by_id[f] for f in _forms(a.waha_message_id) if f in by_id), None)
        if hit is None:
            continue
        matched += 1
        per_campaign[hit[0]].append(reports.Report(message_id=hit[1], outcome=a.outcome, time=a.time))
    for cid, items in per_campaign.items():
        try:
            reports.report_deliveries(db, str(cid), items)
        except errors.NotFound:  # deleted meanwhile: its receipts no longer matter
            matched -= len(items)
    return AckResult(matched, len(acks) - matched)
