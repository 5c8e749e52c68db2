"""Media of a campaign: files under media_dir/<campaign>/<media id>, written atomically."""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import tempfile
import uuid
from pathlib import Path

from campaign_service import audit, errors, lifecycle
from campaign_service.db.models import Media
from campaign_service.ids import parse_uuid
from campaign_service.lifecycle import Op
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import MAX_MEDIA_BYTES, Idem, Replayed
from campaign_service.repository import media as media_repo

log = logging.getLogger("campaign_service.campaigns")


_SAFE_NAME = re.compile(r"[^\w.\- ]+")


def _safe_filename(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    return _SAFE_NAME.sub("_", base)[:255]


def write_atomically(path: Path, content: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class MediaOps(OpsBase):
    """UploadMedia, ListMedia."""

    def upload_media(self, user_id: uuid.UUID, campaign_id: str, filename: str, mime_type: str, content: bytes,
                     idem: Idem | None = None) -> Media | Replayed:
        """Store the file under media_dir/<campaign>/<media id> (atomically) and its row; the file is
        removed again if the transaction does not commit."""
        cid = parse_uuid(campaign_id, "campaign_id")
        v: list[tuple[str, str]] = []
        name = _safe_filename(filename)
        if not name:
            v.append(("filename", "required"))
        mime = mime_type.strip() or (mimetypes.guess_type(name)[0] or "")
        if not mime or "/" not in mime:
            v.append(("mime_type", "required (e.g. image/jpeg)"))
        if not content:
            v.append(("content", "empty file"))
        elif len(content) > MAX_MEDIA_BYTES:
            v.append(("content", f"at most {MAX_MEDIA_BYTES} bytes (16 MiB)"))
        if v:
            raise errors.InvalidArgument(v)
        path: Path | None = None
        try:
            with self.db.transaction() as s:
                if (r := self._replay(s, user_id, idem)) is not None:
                    return r
                c = self._campaign(s, user_id, cid, lock=True)
                lifecycle.check(Op.UPLOAD_MEDIA, c.state)
                mid = uuid.uuid4()
                rel = f"{cid}/{mid}"
                path = self.settings.media_dir / rel
                write_atomically(path, content)
                m = media_repo.insert(s, media_id=mid, campaign_id=cid, filename=name, mime_type=mime,
                                      size_bytes=len(content), path=rel)
                audit.record(s, user_id=user_id, action="campaign.upload_media", entity_type="campaign",
                             entity_id=str(cid), description=f"Media {name} uploaded to '{c.name}'.",
                             extra_data={"media_id": str(mid), "filename": name, "mime_type": mime,
                                         "size_bytes": len(content)})
                self._remember(s, user_id, idem, m)
        except BaseException:
            if path is not None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            raise
        log.info("campaign=%s media %s uploaded (%s, %d bytes)", cid, m.id, mime, m.size_bytes)
        return m

    def list_media(self, user_id: uuid.UUID, campaign_id: str) -> list[Media]:
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.session() as s:
            self._campaign(s, user_id, cid)
            return media_repo.of_campaign(s, cid)
