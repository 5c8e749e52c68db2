"""Campaign media rows (files live under settings.media_dir; see ops/media.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from campaign_service.db.models import Media


def insert(session: Session, *, media_id: uuid.UUID, campaign_id: uuid.UUID, filename: str, mime_type: str,
           size_bytes: int, path: str) -> Media:
    m = Media(id=media_id, campaign_id=campaign_id, filename=filename, mime_type=mime_type,
              size_bytes=size_bytes, path=path)
    session.add(m)
    session.flush()
    session.refresh(m)
    return m


def of_campaign(session: Session, campaign_id: uuid.UUID) -> list[Media]:
    return list(session.execute(select(Media).where(Media.campaign_id == campaign_id)
                                .order_by(Media.created_at, Media.id)).scalars())


def ids_of_campaign(session: Session, campaign_id: uuid.UUID) -> set[str]:
    return {str(i) for i in session.execute(select(Media.id).where(Media.campaign_id == campaign_id)).scalars()}


def delete_all(session: Session, campaign_id: uuid.UUID) -> list[str]:
    """Delete the campaign's media rows in one statement; returns their file paths."""
    return list(session.execute(delete(Media).where(Media.campaign_id == campaign_id)
                                .returning(Media.path)).scalars())
