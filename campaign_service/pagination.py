"""AIP-158 pagination: page sizes and opaque keyset page tokens (base64url of a small JSON cursor).

A token is bound to its list kind and filter, so a token from another list is INVALID_ARGUMENT
rather than a silently wrong page."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

from campaign_service import errors

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(value: int, field: str = "page_size") -> int:
    if value < 0:
        raise errors.InvalidArgument([(field, "must not be negative")])
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def encode(kind: str, filter_: str, cursor: list[Any]) -> str:
    raw = json.dumps({"k": kind, "f": filter_, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, kind: str, filter_: str, field: str = "page_token") -> list[Any] | None:
    """The cursor of a token (None for the first page)."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument([(field, "malformed page token")]) from None
    if not isinstance(data, dict) or data.get("k") != kind or not isinstance(data.get("c"), list):
        raise errors.InvalidArgument([(field, "page token does not belong to this list")])
    if data.get("f") != filter_:
        raise errors.InvalidArgument([(field, "page token was issued for a different filter")])
    return data["c"]  # type: ignore[no-any-return]


def decode_created_keyset(token: str, kind: str, filter_: str) -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) cursor of a newest-first list (campaigns, chips); None for the first page."""
    cursor = decode(token, kind, filter_)
    if cursor is None:
        return None
    try:
        return datetime.fromisoformat(cursor[0]), uuid.UUID(cursor[1])
    except (ValueError, IndexError, TypeError):
        raise errors.InvalidArgument([("page_token", "malformed page token")]) from None
