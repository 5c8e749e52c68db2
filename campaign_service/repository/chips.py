"""Chips (a user's WhatsApp numbers)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, select, text, tuple_
from sqlalchemy.orm import Session

from campaign_service.db.models import Chip
from campaign_service.states import CampaignState, ChipState


def insert(session: Session, *, user_id: uuid.UUID, display_name: str, phone: str, waha_base_url: str,
           waha_session: str, waha_api_key: str, proxy_label: str, pacing: dict[str, Any],
           warmup: dict[str, Any] | None = None) -> Chip:
    chip = Chip(id=uuid.uuid4(), user_id=user_id, display_name=display_name, phone=phone,
                waha_base_url=waha_base_url, waha_session=waha_session, waha_api_key=waha_api_key,
                proxy_label=proxy_label, pacing=pacing, warmup=warmup)
    session.add(chip)
    session.flush()
    session.refresh(chip)
    return chip


def same_number(session: Session, user_id: uuid.UUID, phone: str, waha_base_url: str,
                waha_session: str, exclude: uuid.UUID | None = None) -> tuple[Chip, str] | None:
    """A chip of the user (other than `exclude`) that is the same WhatsApp number: same phone, or
    same WAHA server and session; with the field that matched. Serialized per user
    (transaction-scoped advisory lock), so two concurrent registrations of one number cannot both
    pass."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                    {"k": f"chips:{user_id}"})
    q = select(Chip).where(
        Chip.user_id == user_id,
        (Chip.phone == phone) | ((func.lower(Chip.waha_base_url) == waha_base_url.lower())
                                 & (Chip.waha_session == waha_session)))
    if exclude is not None:
        q = q.where(Chip.id != exclude)
    rows = session.execute(q.limit(1)).scalars().all()
    if not rows:
        return None
    return rows[0], "chip.phone" if rows[0].phone == phone else "chip.waha_session"


def get(session: Session, user_id: uuid.UUID, chip_id: uuid.UUID, lock: bool = False) -> Chip | None:
    q = select(Chip).where(Chip.id == chip_id, Chip.user_id == user_id)
    return session.execute(q.with_for_update() if lock else q).scalar_one_or_none()


def page(session: Session, user_id: uuid.UUID, limit: int, after: tuple[datetime, uuid.UUID] | None) -> list[Chip]:
    q = select(Chip).where(Chip.user_id == user_id)
    if after is not None:
        q = q.where(tuple_(Chip.created_at, Chip.id) < tuple_(literal(after[0]), literal(after[1])))
    q = q.order_by(Chip.created_at.desc(), Chip.id.desc()).limit(limit)
    return list(session.execute(q).scalars())


def owned_ids(session: Session, user_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not ids:
        return set()
    return set(session.execute(select(Chip.id).where(Chip.user_id == user_id, Chip.id.in_(list(ids)))).scalars())


def usable(session: Session, user_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> list[Chip]:
    """ACTIVE chips of the user among `ids` (in that order), or all ACTIVE ones when `ids` is empty
    (oldest first, so the round-robin order is stable)."""
    q = select(Chip).where(Chip.user_id == user_id, Chip.state == ChipState.ACTIVE)
    if ids:
        found = {c.id: c for c in session.execute(q.where(Chip.id.in_(list(ids)))).scalars()}
        return [found[i] for i in dict.fromkeys(ids) if i in found]
    return list(session.execute(q.order_by(Chip.created_at, Chip.id)).scalars())


def in_use(session: Session, user_id: uuid.UUID, chip_id: uuid.UUID, running_only: bool = False
           ) -> list[uuid.UUID]:
    """RUNNING (and PAUSED, unless `running_only`) campaigns of the user whose messages go through
    the chip (up to 10)."""
    states = [CampaignState.RUNNING] if running_only else [CampaignState.RUNNING, CampaignState.PAUSED]
    return list(session.execute(text(
        "SELECT c.id FROM campaigns c WHERE c.user_id = :u"
        f" AND c.state IN ({', '.join(str(int(x)) for x in states)}) AND ("
        " :chip = ANY(c.chip_ids) OR (cardinality(c.chip_ids) = 0 AND EXISTS ("
        "  SELECT 1 FROM campaign_messages m WHERE m.campaign_id = c.id AND m.chip_id = :chip)))"
        " LIMIT 10"), {"u": user_id, "chip": chip_id}).scalars())


def delete(session: Session, chip: Chip) -> None:
    session.delete(chip)
    session.flush()


def by_ids(session: Session, user_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> list[Chip]:
    if not ids:
        return []
    return list(session.execute(select(Chip).where(Chip.user_id == user_id, Chip.id.in_(list(ids)))
                                .order_by(Chip.created_at, Chip.id)).scalars())


def count(session: Session, user_id: uuid.UUID) -> int:
    return int(session.execute(select(func.count()).select_from(Chip).where(Chip.user_id == user_id)).scalar_one())
