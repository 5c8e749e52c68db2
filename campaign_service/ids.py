"""Resource ids in requests: UUIDs, or INVALID_ARGUMENT naming the field that carried them."""

from __future__ import annotations

import re
import uuid

from campaign_service import errors


def parse_uuid(value: str, field_name: str) -> uuid.UUID:
    """Ids that are not UUIDs are INVALID_ARGUMENT on the field that carried them."""
    if not value:
        raise errors.InvalidArgument([(field_name, "required")])
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument([(field_name, f"not a valid id: {value!r}")]) from None


_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_uuid(value: str, field_name: str) -> str:
    """The id as `str(parse_uuid(value))` writes it; an id already in that form (what the API
    hands out) is returned as is, without building a UUID (GetCampaign's hot path)."""
    if _CANONICAL.fullmatch(value):
        return value
    return str(parse_uuid(value, field_name))
