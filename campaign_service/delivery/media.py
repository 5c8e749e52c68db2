"""GetMediaContent: a campaign media file for the dispatcher (which has no access to our disk)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from campaign_service import errors
from campaign_service.db.engine import Database
from campaign_service.delivery.common import parse_uuid
from campaign_service.delivery.leases import MediaInfo

_MEDIA = text("""
SELECT id, campaign_id, filename, mime_type, size_bytes, created_at, path, kind, sha256 FROM campaign_media
WHERE id = :id""")


def get_media_content(db: Database, media_dir: Path, media_id: str, offset: int = 0, max_bytes: int = 0
                      ) -> tuple[MediaInfo, bytes]:
    """The row and the file bytes (the range from offset, max_bytes of them unless 0); NOT_FOUND when
    either is missing (or the path escapes media_dir)."""
    mid = parse_uuid(media_id, "media_id")
    if offset < 0 or max_bytes < 0:
        raise errors.InvalidArgument([("offset" if offset < 0 else "max_bytes", "must not be negative")])
    with db.session() as s:
        r = s.execute(_MEDIA, {"id": str(mid)}).one_or_none()
    if r is None:
        raise errors.NotFound("media", media_id)
    root = Path(media_dir).resolve()
    path = (root / r.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise errors.NotFound("media", media_id)
    with path.open("rb") as f:
        f.seek(offset)
        content = f.read(max_bytes if max_bytes > 0 else -1)
    return (MediaInfo(r.id, r.campaign_id, r.filename, r.mime_type, r.size_bytes, r.created_at, r.path, r.kind,
                      r.sha256 or ""), content)
