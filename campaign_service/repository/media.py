"""Campaign media rows (files live under settings.media_dir; see ops/media.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from campaign_service.db.models import Media


def insert(session: Session, *, media_id: uuid.UUID, campaign_id: uuid.UUID, filename: str, mime_type: str,
           size_bytes: int, path: str, sha256: str | None = None, kind: int = 0) -> Media:
    m = Media(id=media_id, campaign_id=campaign_id, filename=filename, mime_type=mime_type,
              size_bytes=size_bytes, path=path, sha256=sha256, kind=kind)
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


# -- shared files (media dedup): rows of one user with the same content share one path ---------------
_LOCK_PATH = text("SELECT pg_advisory_xact_lock(hashtextextended(:p, 0))")


def lock_paths(session: Session, paths: list[str]) -> None:
    """Serialize, until commit, everything that creates, reuses or removes these files (sorted: no
    deadlock between two deletes); a campaign lock, if any, is taken before."""
    for p in sorted(set(paths)):
        session.execute(_LOCK_PATH, {"p": p})


def get(session: Session, campaign_id: uuid.UUID, media_id: uuid.UUID) -> Media | None:
    return session.execute(select(Media).where(Media.campaign_id == campaign_id, Media.id == media_id)
                           ).scalar_one_or_none()


def unused_paths(session: Session, paths: list[str]) -> list[str]:
    """Those of `paths` no row points at any more (after the caller deleted its rows)."""
    if not paths:
        return []
    used = set(session.execute(select(Media.path).where(Media.path.in_(set(paths))).group_by(Media.path)).scalars())
    return sorted(set(paths) - used)


def path_in_use(session: Session, path: str) -> bool:
    return bool(session.execute(select(func.count()).select_from(Media).where(Media.path == path)).scalar_one())
