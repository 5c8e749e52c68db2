"""GetMediaContent: a campaign media file for the dispatcher (which has no access to our disk)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from campaign_service import errors
from campaign_service.db.engine import Database
from campaign_service.delivery.common import parse_uuid
from campaign_service.delivery.leases import MediaInfo

_MEDIA = text("""
SELECT id, campaign_id, filename, mime_type, size_bytes, created_at, path FROM campaign_media WHERE id = :id""")


def get_media_content(db: Database, media_dir: Path, media_id: str) -> tuple[MediaInfo, bytes]:
    """The row and the file bytes; NOT_FOUND when either is missing (or the path escapes media_dir)."""
    mid = parse_uuid(media_id, "media_id")
    with db.session() as s:
        r = s.execute(_MEDIA, {"id": str(mid)}).one_or_none()
    if r is None:
        raise errors.NotFound("media", media_id)
    root = Path(media_dir).resolve()
    path = (root / r.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise errors.NotFound("media", media_id)
    content = path.read_bytes()
    return MediaInfo(r.id, r.campaign_id, r.filename, r.mime_type, r.size_bytes, r.created_at, r.path), content
