"""Protobuf <-> storage: proto JSON for the JSONB columns, and rows -> API resources.

Parsing JSON into messages is the expensive part of rendering a Campaign, so the parsed
templates/settings are memoized per (campaign id, version): they only change with the version."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from datetime import datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from campaign_service.db.models import Campaign, Chip, Contact, Media
from campaign_service.repository.messages import MessageRow
from whago.campaign.v1 import resources_pb2 as res


def to_json(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg)  # type: ignore[no-any-return]


def templates_to_json(templates: list[res.MessageTemplate]) -> list[dict[str, Any]]:
    return [to_json(t) for t in templates]


def templates_from_json(data: list[dict[str, Any]]) -> list[res.MessageTemplate]:
    return [json_format.ParseDict(t, res.MessageTemplate(), ignore_unknown_fields=True) for t in data or []]


def settings_from_json(data: dict[str, Any]) -> res.CampaignSettings:
    return json_format.ParseDict(data or {}, res.CampaignSettings(), ignore_unknown_fields=True)


def pacing_from_json(data: dict[str, Any]) -> res.Pacing:
    return json_format.ParseDict(data or {}, res.Pacing(), ignore_unknown_fields=True)


def ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt)
    return t


def etag(version: int) -> str:
    return f'W/"{version}"'


class _BodyCache:
    """(campaign id, version) -> serialized templates+settings part of the Campaign."""

    def __init__(self, size: int = 20_000) -> None:
        self._d: OrderedDict[tuple[uuid.UUID, int], bytes] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, c: Campaign) -> bytes:
        key = (c.id, c.version)
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
                return hit
        body = res.Campaign(templates=templates_from_json(c.templates),
                            settings=settings_from_json(c.settings)).SerializeToString()
        with self._lock:
            self._d[key] = body
            if len(self._d) > self._size:
                self._d.popitem(last=False)
        return body


_bodies = _BodyCache()


def campaign(c: Campaign) -> res.Campaign:
    out = res.Campaign.FromString(_bodies.get(c))
    out.id = str(c.id)
    out.name = c.name
    out.description = c.description
    out.state = c.state  # type: ignore[assignment]
    out.state_reason = c.state_reason
    out.chip_ids.extend(str(i) for i in c.chip_ids)
    for field, value in (("schedule_time", c.schedule_time), ("create_time", c.created_at),
                         ("update_time", c.updated_at), ("start_time", c.started_at),
                         ("complete_time", c.completed_at)):
        if value is not None:
            getattr(out, field).FromDatetime(value)
    out.total_contacts = c.total_contacts
    out.pending_count = c.pending_count
    out.sent_count = c.sent_count
    out.delivered_count = c.delivered_count
    out.read_count = c.read_count
    out.failed_count = c.failed_count
    out.skipped_count = c.skipped_count
    out.etag = etag(c.version)
    return out


def chip(c: Chip) -> res.Chip:
    """The API view of a chip: the WAHA API key is write-only and never leaves the service."""
    out = res.Chip(id=str(c.id), display_name=c.display_name, phone=c.phone, waha_base_url=c.waha_base_url,
                   waha_session=c.waha_session, proxy_label=c.proxy_label, state=c.state,  # type: ignore[arg-type]
                   state_reason=c.state_reason, pacing=pacing_from_json(c.pacing))
    out.create_time.FromDatetime(c.created_at)
    out.update_time.FromDatetime(c.updated_at)
    return out


def contact(c: Contact) -> res.Contact:
    return res.Contact(id=str(c.id), phone=c.phone, chat_id=c.chat_id, name=c.name, variables=c.variables or {})


def message(m: MessageRow) -> res.CampaignMessage:
    out = res.CampaignMessage(id=str(m.id), campaign_id=str(m.campaign_id), contact_id=str(m.contact_id),
                              phone=m.phone, chat_id=m.chat_id, chip_id=str(m.chip_id),
                              state=m.state,  # type: ignore[arg-type]
                              waha_message_id=m.waha_message_id or "", failure_reason=m.failure_reason or "",
                              attempts=m.attempts)
    if m.sent_at is not None:
        out.sent_time.FromDatetime(m.sent_at)
    out.update_time.FromDatetime(m.updated_at)
    return out


def media(m: Media) -> res.Media:
    out = res.Media(id=str(m.id), campaign_id=str(m.campaign_id), filename=m.filename, mime_type=m.mime_type,
                    size_bytes=m.size_bytes)
    out.create_time.FromDatetime(m.created_at)
    return out
