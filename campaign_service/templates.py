"""Message templates: which template a message uses and how its text is rendered for a contact.

The one place that turns a campaign's stored templates into the text a contact receives (the lease
renders every message through it)."""

from __future__ import annotations

import functools
import re
import uuid
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


@functools.lru_cache(maxsize=256)
def _split(template: str) -> tuple[str, ...]:
    """A template cut at its placeholders: literal, key, literal, ..., literal (a campaign's few
    templates are cut once, not once per message of every lease)."""
    return tuple(_PLACEHOLDER.split(template))


def render(template: str, name: str, phone: str, variables: dict[str, Any] | None) -> str:
    """Fill {{name}}, {{phone}} and {{<variable>}}; unknown placeholders become empty."""
    parts = _split(template)
    if len(parts) == 1:
        return template
    out = list(parts)
    for i in range(1, len(out), 2):
        key = out[i]
        if key == "phone":
            out[i] = phone
        elif key == "name" and name:
            out[i] = name
        else:
            v = variables.get(key) if variables else None
            out[i] = "" if v is None else str(v)
    return "".join(out)


def template_parts(templates: list[dict[str, Any]] | None, index: int) -> tuple[str, uuid.UUID | None]:
    """(text, media id) of templates[index] as stored (proto JSON; camelCase or field names)."""
    if not templates:
        return "", None
    t = templates[index % len(templates)] or {}
    media = t.get("mediaId") or t.get("media_id") or ""
    try:
        media_id = uuid.UUID(str(media)) if media else None
    except ValueError:
        media_id = None
    return str(t.get("text") or ""), media_id
