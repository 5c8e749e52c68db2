"""Resource ids in requests: UUIDs, or INVALID_ARGUMENT naming the field that carried them."""

from __future__ import annotations

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
