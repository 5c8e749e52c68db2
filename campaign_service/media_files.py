"""Media content: its real type sniffed from the bytes (`filetype`), WhatsApp's kind and size limit,
and the streaming of an upload into a temp file beside its final place.

Why sniff: a client's MIME type is a claim; WhatsApp refuses (or a recipient's phone mis-renders) a
file whose bytes are something else, and a number that sends such files gets reported. The stored
type is the sniffed one, so the send endpoint follows the bytes, never the claim.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import filetype

from campaign_service import errors
from campaign_service.config import Settings

#: filetype reads this many leading bytes; the stream is sniffed once it holds them (or ends).
SNIFF_BYTES = 8192


class Kind(IntEnum):
    """whago.campaign.v1.MediaKind."""

    UNSPECIFIED = 0
    IMAGE = 1
    VIDEO = 2
    AUDIO = 3
    DOCUMENT = 4


#: The types WhatsApp shows as image / video / audio; every other recognised type is a document.
MEDIA_KINDS: dict[str, Kind] = {
    "image/jpeg": Kind.IMAGE, "image/png": Kind.IMAGE,
    "video/mp4": Kind.VIDEO, "video/3gpp": Kind.VIDEO,
    "audio/aac": Kind.AUDIO, "audio/amr": Kind.AUDIO, "audio/mpeg": Kind.AUDIO, "audio/mp4": Kind.AUDIO,
    "audio/ogg": Kind.AUDIO,
}
#: Declared names for the type filetype reports (what browsers and OSes send).
ALIASES: dict[str, str] = {
    "image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
    "audio/mp3": "audio/mpeg", "audio/x-mp3": "audio/mpeg", "audio/mpeg3": "audio/mpeg", "audio/x-mpeg": "audio/mpeg",
    "audio/opus": "audio/ogg", "application/ogg": "audio/ogg", "audio/x-m4a": "audio/mp4", "audio/m4a": "audio/mp4",
    "audio/aacp": "audio/aac", "audio/x-aac": "audio/aac", "video/3gp": "video/3gpp",
    "audio/wav": "audio/x-wav", "audio/wave": "audio/x-wav", "audio/flac": "audio/x-flac",
    "application/x-pdf": "application/pdf", "application/x-zip-compressed": "application/zip",
}
#: Same container, another declared use: (declared, sniffed) pairs kept as declared.
CONTAINERS: frozenset[tuple[str, str]] = frozenset({
    ("audio/mp4", "video/mp4"), ("video/mp4", "video/x-m4v"),
    *(("application/" + d, "application/zip") for d in (
        "vnd.openxmlformats-officedocument.wordprocessingml.document",
        "vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "vnd.openxmlformats-officedocument.presentationml.presentation",
        "vnd.oasis.opendocument.text", "vnd.oasis.opendocument.spreadsheet",
        "vnd.oasis.opendocument.presentation", "epub+zip")),
})
#: Plain-text documents have no magic number: accepted when declared and the bytes are UTF-8 text.
TEXT_TYPES = frozenset({"text/plain", "text/csv", "text/tab-separated-values", "text/calendar",
                        "text/vcard", "text/x-vcard"})
#: Programs are not media: nobody needs to bulk-send them, and they get numbers banned.
REFUSED_TYPES = frozenset({"application/x-msdownload", "application/x-executable", "application/x-deb",
                           "application/x-rpm", "application/x-google-chrome-extension",
                           "application/x-shockwave-flash", "application/wasm"})


def canonical(mime: str) -> str:
    """Lowercase, no parameters (`audio/ogg; codecs=opus` -> `audio/ogg`), aliases resolved."""
    m = mime.split(";", 1)[0].strip().lower()
    return ALIASES.get(m, m)


def kind_of(mime: str) -> Kind:
    return MEDIA_KINDS.get(canonical(mime), Kind.DOCUMENT)


@dataclass(frozen=True)
class Limits:
    image: int
    video: int
    audio: int
    document: int

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(s.media_max_image_bytes, s.media_max_video_bytes, s.media_max_audio_bytes,
                   s.media_max_document_bytes)

    def of_kind(self, kind: Kind) -> int:
        return {Kind.IMAGE: self.image, Kind.VIDEO: self.video, Kind.AUDIO: self.audio}.get(kind, self.document)

    @property
    def largest(self) -> int:
        return max(self.image, self.video, self.audio, self.document)


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB" if n >= 1024 * 1024 and n % (1024 * 1024) == 0 else f"{n} bytes"


def too_large(kind: Kind, limit: int) -> errors.InvalidArgument:
    return errors.InvalidArgument([("content", f"{kind.name.lower()} files are limited to {_size(limit)} "
                                               f"({limit} bytes)")])


def sniff(head: bytes, declared: str, filename: str) -> tuple[str, Kind]:
    """(stored MIME type, kind) for content starting with `head`; INVALID_ARGUMENT naming mime_type
    when the bytes are not what was declared, content when they are nothing we send."""
    want = canonical(declared)
    got = filetype.guess_mime(head) if head else None
    if got is None:
        text_type = want or canonical(mimetypes.guess_type(filename)[0] or "")
        if text_type in TEXT_TYPES and _is_text(head):
            return text_type, Kind.DOCUMENT
        if want:
            raise errors.InvalidArgument([("mime_type", f"declared {want}, but the content is not a recognisable "
                                                        f"{want} file")])
        raise errors.InvalidArgument([("content", "unrecognised file type (declare mime_type for text files)")])
    if want and want != got and (want, got) not in CONTAINERS:
        raise errors.InvalidArgument([("mime_type", f"declared {want}, but the content is {got}")])
    if got in REFUSED_TYPES:
        raise errors.InvalidArgument([("content", f"{got} files are not accepted as media")])
    mime = want if (want, got) in CONTAINERS else got
    return mime, kind_of(mime)


def _is_text(head: bytes) -> bool:
    """UTF-8 without NULs (a multi-byte character cut at the end of the head is fine)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


@dataclass(frozen=True)
class Staged:
    """An upload that passed every check, in its temp file (to be moved to its final place)."""

    tmp: Path
    sha256: str
    size: int
    mime_type: str
    kind: Kind


class Stager:
    """Streams one upload into a temp file in `directory`: sha256 on the way, the type sniffed from
    the first SNIFF_BYTES, the kind's limit enforced as bytes arrive (so an oversized stream is
    refused when it crosses the limit, not after it was stored). Used as a context manager: any
    exception removes the temp file; `finish` hands it over."""

    def __init__(self, directory: Path, declared_mime: str, filename: str, limits: Limits) -> None:
        self.directory = directory
        self.declared = declared_mime
        self.filename = filename
        self.limits = limits
        self.hash = hashlib.sha256()
        self.size = 0
        self.head = bytearray()
        self.sniffed: tuple[str, Kind] | None = None
        self.limit = limits.largest
        self._fd: int | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.discard()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.size + len(data) > self.limit:
            kind = self.sniffed[1] if self.sniffed else self._sniff_now(bytes(self.head) + data[:SNIFF_BYTES])
            raise too_large(kind, self.limits.of_kind(kind))
        self.size += len(data)
        self.hash.update(data)
        if self.sniffed is None:
            self.head += data
            if len(self.head) < SNIFF_BYTES:
                return
            self._sniffed()
            data, self.head = bytes(self.head), bytearray()
        self._write_out(data)

    def _sniff_now(self, head: bytes) -> Kind:
        return sniff(head[:SNIFF_BYTES], self.declared, self.filename)[1]

    def _sniffed(self) -> None:
        self.sniffed = sniff(bytes(self.head[:SNIFF_BYTES]), self.declared, self.filename)
        self.limit = self.limits.of_kind(self.sniffed[1])
        if self.size > self.limit:
            raise too_large(self.sniffed[1], self.limit)

    def _write_out(self, data: bytes) -> None:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd, name = tempfile.mkstemp(dir=self.directory, prefix=".upload-")
            self._tmp = Path(name)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def finish(self) -> Staged:
        """Sniff what is left, fsync and close; the caller owns the temp file from here."""
        if self.size == 0:
            raise errors.InvalidArgument([("content", "empty file")])
        if self.sniffed is None:
            self._sniffed()
            data, self.head = bytes(self.head), bytearray()
            self._write_out(data)
        assert self._fd is not None and self._tmp is not None and self.sniffed is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        return Staged(self._tmp, self.hash.hexdigest(), self.size, *self.sniffed)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


def user_dir(user_id: object) -> str:
    """Where a user's media live, relative to media_dir: one file per content (`u/<user>/<sha256>`)."""
    return f"u/{user_id}"


def place(staged: Staged, target: Path) -> bool:
    """Move the staged file to `target` unless that content is already there (dedup); True when
    this call created the file. Callers hold the path's advisory lock."""
    try:
        if target.stat().st_size == staged.size:
            staged.tmp.unlink(missing_ok=True)
            return False
    except FileNotFoundError:
        pass
    os.replace(staged.tmp, target)
    return True
