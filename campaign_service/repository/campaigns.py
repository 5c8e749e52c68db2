"""Campaign rows. Reads are one row (the counters live on it); lists use keyset pagination on
ix_campaigns_user_created / ix_campaigns_user_state_created."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, literal, select, tuple_
from sqlalchemy.orm import Session

from campaign_service.db.models import Campaign


def insert(session: Session, **fields: Any) -> Campaign:
    c = Campaign(id=uuid.uuid4(), **fields)
    session.add(c)
    session.flush()
    session.refresh(c)
    return c


def get(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, *, for_update: bool = False) -> Campaign | None:
    q = select(Campaign).where(Campaign.id == campaign_id, Campaign.user_id == user_id)
    if for_update:
        q = q.with_for_update()
    return session.execute(q).scalar_one_or_none()


def get_any(session: Session, campaign_id: uuid.UUID, *, for_update: bool = False) -> Campaign | None:
    """By id regardless of owner (internal callers: scheduler, delivery)."""
    q = select(Campaign).where(Campaign.id == campaign_id)
    if for_update:
        q = q.with_for_update()
    return session.execute(q).scalar_one_or_none()


def page(session: Session, user_id: uuid.UUID, state: int, limit: int,
         after: tuple[datetime, uuid.UUID] | None) -> list[Any]:
    """Core rows (attribute access like the ORM objects, without the identity-map cost)."""
    q = select(*Campaign.__table__.c).where(Campaign.user_id == user_id)
    if state:
        q = q.where(Campaign.state == state)
    if after is not None:
        q = q.where(tuple_(Campaign.created_at, Campaign.id) < tuple_(literal(after[0]), literal(after[1])))
    q = q.order_by(Campaign.created_at.desc(), Campaign.id.desc()).limit(limit)
    return list(session.execute(q).all())


def touch(session: Session, c: Campaign) -> None:
    """Flush pending attribute changes with a version bump and a fresh updated_at, then reload."""
    c.version = c.version + 1
    c.updated_at = func.now()
    session.flush()
    session.refresh(c)


def delete_row(session: Session, campaign_id: uuid.UUID) -> int:
    return session.execute(delete(Campaign).where(Campaign.id == campaign_id)).rowcount  # type: ignore[attr-defined, no-any-return]
