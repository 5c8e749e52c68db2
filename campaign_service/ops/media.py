"""Media of a campaign: rows per campaign, content stored once per sha256 per user under
media_dir/u/<user>/<sha256> (see media_files), moved into place atomically under the path's lock."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from campaign_service import audit, errors, lifecycle
from campaign_service.db.engine import Database
from campaign_service.db.models import Media
from campaign_service.ids import parse_uuid
from campaign_service.lifecycle import Op
from campaign_service.media_files import Limits, Staged, Stager, place, user_dir
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import Idem, Replayed
from campaign_service.repository import media as media_repo
from campaign_service.templates import template_parts

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


@dataclass(frozen=True)
class MediaDeleted:
    media_id: str
    file_deleted: bool


def remove_unused_files(db: Database, media_dir: Path, paths: Iterable[str]) -> int:
    """After a commit that dropped rows: remove each file no row points at any more, re-checked
    under the path's lock (an upload of the same content may have reused it meanwhile). Returns
    how many files were removed."""
    removed = 0
    for rel in sorted(set(paths)):
        try:
            with db.transaction() as s:
                media_repo.lock_paths(s, [rel])
                if media_repo.path_in_use(s, rel):
                    continue
                (media_dir / rel).unlink()
                removed += 1
        except FileNotFoundError:
            pass
        except Exception as exc:  # the rows are gone already; a leftover file is only disk space
            log.warning("media file %s not removed: %s", rel, exc)
    return removed


class MediaOps(OpsBase):
    """UploadMedia, UploadMediaChunks, ListCampaignMedia, DeleteMedia."""

    def upload_media(self, user_id: uuid.UUID, campaign_id: str, filename: str, mime_type: str, content: bytes,
                     idem: Idem | None = None) -> Media | Replayed:
        """The unary upload: the same checks and storage as a stream of one chunk."""
        return self.upload_stream(user_id, campaign_id, filename, mime_type, [content], idem)

    def upload_stream(self, user_id: uuid.UUID, campaign_id: str, filename: str, mime_type: str,
                      chunks: Iterable[bytes], idem: Idem | None = None) -> Media | Replayed:
        """Check the target first (a 100 MiB stream into a RUNNING campaign is refused before it is
        read), stream the bytes into a temp file (sniffed, hashed, size-limited), then store: the
        file once per content, the row per campaign. Any failure leaves no row and no file."""
        cid = parse_uuid(campaign_id, "campaign_id")
        name = _safe_filename(filename)
        if not name:
            raise errors.InvalidArgument([("filename", "required")])
        with self.db.session() as s:
            c = self._campaign(s, user_id, cid)
            lifecycle.check(Op.UPLOAD_MEDIA, c.state)
        rel_dir = user_dir(user_id)
        with Stager(self.settings.media_dir / rel_dir, mime_type, name, Limits.of(self.settings)) as stager:
            for chunk in chunks:
                stager.write(chunk)
            staged = stager.finish()
        return self._store(user_id, cid, name, staged, f"{rel_dir}/{staged.sha256}", idem)

    def _store(self, user_id: uuid.UUID, cid: uuid.UUID, name: str, staged: Staged, rel: str,
               idem: Idem | None) -> Media | Replayed:
        created = False
        try:
            with self.db.transaction() as s:
                if (r := self._replay(s, user_id, idem)) is not None:
                    staged.tmp.unlink(missing_ok=True)
                    return r
                c = self._campaign(s, user_id, cid, lock=True)
                lifecycle.check(Op.UPLOAD_MEDIA, c.state)
                media_repo.lock_paths(s, [rel])
                created = place(staged, self.settings.media_dir / rel)
                mid = uuid.uuid4()
                m = media_repo.insert(s, media_id=mid, campaign_id=cid, filename=name, mime_type=staged.mime_type,
                                      size_bytes=staged.size, path=rel, sha256=staged.sha256, kind=int(staged.kind))
                audit.record(s, user_id=user_id, action="campaign.upload_media", entity_type="campaign",
                             entity_id=str(cid), description=f"Media {name} uploaded to '{c.name}'.",
                             extra_data={"media_id": str(mid), "filename": name, "mime_type": staged.mime_type,
                                         "kind": staged.kind.name, "sha256": staged.sha256,
                                         "size_bytes": staged.size, "stored_again": not created})
                self._remember(s, user_id, idem, m)
        except BaseException:
            staged.tmp.unlink(missing_ok=True)
            if created:
                remove_unused_files(self.db, self.settings.media_dir, [rel])
            raise
        log.info("campaign=%s media %s uploaded (%s %s, %d bytes, %s)", cid, m.id, staged.kind.name,
                 staged.mime_type, m.size_bytes, "new file" if created else "content already stored")
        return m

    def list_media(self, user_id: uuid.UUID, campaign_id: str) -> list[Media]:
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.session() as s:
            self._campaign(s, user_id, cid)
            return media_repo.of_campaign(s, cid)

    def delete_media(self, user_id: uuid.UUID, campaign_id: str, media_id: str, idem: Idem | None = None
                     ) -> MediaDeleted | Replayed:
        """DRAFT/SCHEDULED only, and not while a template uses it (Start would fail on it); the file
        goes once no other campaign of the user uses the same content."""
        cid = parse_uuid(campaign_id, "campaign_id")
        mid = parse_uuid(media_id, "media_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.DELETE_MEDIA, c.state)
            m = media_repo.get(s, cid, mid)
            if m is None:
                raise errors.NotFound("media", media_id)
            templates = c.templates or []
            for i in range(len(templates)):
                if template_parts(templates, i)[1] == mid:
                    raise errors.FailedPrecondition(
                        "MEDIA_IN_USE", f"templates[{i}] uses this media; remove it from the template first",
                        {"template_index": str(i), "media_id": str(mid)})
            rel = m.path
            media_repo.lock_paths(s, [rel])
            s.delete(m)
            s.flush()
            unused = bool(media_repo.unused_paths(s, [rel]))
            audit.record(s, user_id=user_id, action="campaign.delete_media", entity_type="campaign",
                         entity_id=str(cid), description=f"Media {m.filename} deleted from '{c.name}'.",
                         extra_data={"media_id": str(mid), "filename": m.filename, "file_deleted": unused})
            result = MediaDeleted(str(mid), unused)
            self._remember(s, user_id, idem, result)
        if unused:
            remove_unused_files(self.db, self.settings.media_dir, [rel])
        log.info("campaign=%s media %s deleted (file %s)", cid, mid, "removed" if unused else "still used")
        return result
