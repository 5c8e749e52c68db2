"""Protobuf <-> storage: proto JSON for the JSONB columns, and rows -> API resources.

Parsing JSON into messages is the expensive part of rendering a Campaign, so the parsed
templates/settings are memoized per (campaign id, version): they only change with the version."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from campaign_service.db.models import (
    AuditEvent,
    Campaign,
    Chip,
    Contact,
    CreditTransaction,
    Event,
    Media,
    WebhookEndpoint,
)
from campaign_service.relay.payloads import EventRow
from campaign_service.repository.credits import Balance
from campaign_service.repository.messages import MessageRow
from campaign_service.states import DeliveryState
from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import events_pb2
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh


def to_json(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg)  # type: ignore[no-any-return]


def templates_to_json(templates: list[res.MessageTemplate]) -> list[dict[str, Any]]:
    return [to_json(t) for t in templates]


_TEMPLATE_KEYS = frozenset({"text", "mediaId"})
_PACING_KEYS = {"intervalMinSeconds": "interval_min_seconds", "intervalMaxSeconds": "interval_max_seconds",
                "maxPerHour": "max_per_hour", "maxPerDay": "max_per_day"}
_CAMOUFLAGE_KEYS = {"sendSeen": "send_seen", "typing": "typing", "typingCharsPerSecond": "typing_chars_per_second",
                    "typingMaxSeconds": "typing_max_seconds"}
_WINDOW_KEYS = frozenset({"timezone", "startHour", "endHour", "weekdays"})


def templates_from_json(data: list[dict[str, Any]]) -> list[res.MessageTemplate]:
    out = []
    for t in data or []:
        if t.keys() <= _TEMPLATE_KEYS:  # fast path: what templates_to_json writes
            out.append(res.MessageTemplate(text=t.get("text", ""), media_id=t.get("mediaId", "")))
        else:
            out.append(json_format.ParseDict(t, res.MessageTemplate(), ignore_unknown_fields=True))
    return out


def _fill_pacing(data: dict[str, Any], p: res.Pacing) -> bool:
    for k, v in data.items():
        f = _PACING_KEYS.get(k)
        if f is not None:
            setattr(p, f, v)
        elif k == "window" and isinstance(v, dict) and v.keys() <= _WINDOW_KEYS:
            p.window.SetInParent()
            p.window.timezone = v.get("timezone", "")
            p.window.start_hour = v.get("startHour", 0)
            p.window.end_hour = v.get("endHour", 0)
            p.window.weekdays.extend(v.get("weekdays", ()))
        else:
            return False
    return True


def settings_from_json(data: dict[str, Any]) -> res.CampaignSettings:
    """Hand-written for the keys MessageToDict writes (json_format is slow); anything else falls back."""
    s = res.CampaignSettings()
    try:
        for k, v in (data or {}).items():
            if k == "pacing":
                s.pacing.SetInParent()
                if not _fill_pacing(v, s.pacing):
                    raise ValueError(k)
            elif k == "camouflage":
                s.camouflage.SetInParent()
                for ck, cv in v.items():
                    setattr(s.camouflage, _CAMOUFLAGE_KEYS[ck], cv)
            elif k == "shuffleContacts":
                s.shuffle_contacts = v
            elif k == "maxFailures":
                s.max_failures = v
            else:
                raise ValueError(k)
    except (ValueError, KeyError, TypeError, AttributeError):
        return json_format.ParseDict(data or {}, res.CampaignSettings(), ignore_unknown_fields=True)
    return s


def warmup_from_json(data: dict[str, Any] | None) -> res.WarmupPlan | None:
    """A chip's stored warm-up plan; None when it has none."""
    if data is None:
        return None
    return json_format.ParseDict(data, res.WarmupPlan(), ignore_unknown_fields=True)


def pacing_from_json(data: dict[str, Any]) -> res.Pacing:
    p = res.Pacing()
    try:
        if _fill_pacing(data or {}, p):
            return p
    except (ValueError, TypeError, AttributeError):
        pass
    return json_format.ParseDict(data or {}, res.Pacing(), ignore_unknown_fields=True)


def ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt)
    return t


def etag(version: int) -> str:
    return f'W/"{version}"'


def _body(templates: list[dict[str, Any]], settings: dict[str, Any]) -> bytes:
    """The serialized templates+settings part of a Campaign."""
    if not templates and not settings:
        return b""
    return res.Campaign(templates=templates_from_json(templates),
                        settings=settings_from_json(settings)).SerializeToString()


class _BodyCache:
    """Serialized templates+settings, memoized by (campaign id, version) for ORM objects and by the
    JSON text itself for view rows (campaigns often share settings, and a list page of 100 rows
    then parses each distinct text once)."""

    def __init__(self, size: int = 20_000) -> None:
        self._d: OrderedDict[Any, bytes] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def _lookup(self, key: Any) -> bytes | None:
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
            return hit

    def _store(self, key: Any, body: bytes) -> bytes:
        with self._lock:
            self._d[key] = body
            if len(self._d) > self._size:
                self._d.popitem(last=False)
        return body

    def get(self, c: Any) -> bytes:
        key = (c.id, c.version)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        return self._store(key, _body(c.templates, c.settings))

    def from_json(self, templates_json: str, settings_json: str) -> bytes:
        key = (templates_json, settings_json)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        return self._store(key, _body(json.loads(templates_json), json.loads(settings_json)))


_bodies = _BodyCache()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_Timestamp = timestamp_pb2.Timestamp


def _stamp(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    """Timestamp.FromDatetime, without its time tuple round trip (naive means UTC, as there)."""
    if dt is None:
        return None
    d = (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)) - _EPOCH
    return _Timestamp(seconds=d.days * 86400 + d.seconds, nanos=d.microseconds * 1000)


def _campaign(c: Any, id_: str, chip_ids: Any, body: bytes,
              make: Callable[..., res.Campaign] = res.Campaign) -> res.Campaign:
    """`make` is res.Campaign, or a repeated field's `add` to build the message in place there."""
    out = make(
        id=id_, name=c.name, description=c.description, state=c.state, state_reason=c.state_reason, chip_ids=chip_ids,
        schedule_time=_stamp(c.schedule_time), create_time=_stamp(c.created_at),
        update_time=_stamp(c.updated_at), start_time=_stamp(c.started_at), complete_time=_stamp(c.completed_at),
        total_contacts=c.total_contacts, pending_count=c.pending_count, sent_count=c.sent_count,
        delivered_count=c.delivered_count, read_count=c.read_count, failed_count=c.failed_count,
        skipped_count=c.skipped_count, opted_out_count=c.opted_out_count, etag=f'W/"{c.version}"')
    if body:
        out.MergeFromString(body)
    return out


def campaign(c: Campaign | Any) -> res.Campaign:
    """A Campaign resource from an ORM object (or a row of all the campaigns table's columns)."""
    return _campaign(c, str(c.id), [str(i) for i in c.chip_ids], _bodies.get(c))


class _Rendered:
    """The Campaign last rendered for each campaign id, with the view row it came from: a row equal
    to that one in every column (counters, times and version included) gets the same message back.
    Every read still fetches its row from PostgreSQL; this only skips rendering an unchanged row
    again (~15 µs, the largest part of GetCampaign's own Python). The message is shared: callers
    hand it to gRPC or copy it, never change it. Used on the event loop only."""

    def __init__(self, size: int = 20_000) -> None:
        self._d: dict[str, tuple[Any, res.Campaign]] = {}
        self._size = size

    def get(self, row: Any) -> res.Campaign:
        hit = self._d.get(row.id)
        if hit is not None and (hit[0] is row or hit[0] == row):  # `is`: an unchanged row read again
            return hit[1]
        out = _campaign(row, row.id, row.chip_ids, _bodies.from_json(row.templates_json, row.settings_json))
        if hit is None and len(self._d) >= self._size:
            del self._d[next(iter(self._d))]  # the oldest
        self._d[row.id] = (row, out)
        return out


_rendered = _Rendered()


def campaign_view(row: Any) -> res.Campaign:
    """A Campaign resource from a row of campaigns_repo.VIEW_COLUMNS (on the event loop; shared when
    the row is unchanged since it was last rendered: do not modify it)."""
    return _rendered.get(row)


def campaign_views_into(rows: Iterable[Any], into: Any) -> None:
    """campaign_view of each row, built in place in the repeated field `into`: adding standalone
    messages to a repeated field copies each (~15% of rendering a page of 100)."""
    add = into.add
    for row in rows:
        _campaign(row, row.id, row.chip_ids, _bodies.from_json(row.templates_json, row.settings_json), add)


def chip(c: Chip) -> res.Chip:
    """The API view of a chip: the WAHA API key is write-only and never leaves the service."""
    out = res.Chip(id=str(c.id), display_name=c.display_name, phone=c.phone, waha_base_url=c.waha_base_url,
                   waha_session=c.waha_session, proxy_label=c.proxy_label, state=c.state,  # type: ignore[arg-type]
                   state_reason=c.state_reason, pacing=pacing_from_json(c.pacing))
    if (plan := warmup_from_json(c.warmup)) is not None:
        out.warmup.CopyFrom(plan)
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
                              attempts=m.attempts, template_index=m.template_index, variant=m.variant)
    if m.sent_at is not None:
        out.sent_time.FromDatetime(m.sent_at)
    out.update_time.FromDatetime(m.updated_at)
    return out


def media(m: Media) -> res.Media:
    out = res.Media(id=str(m.id), campaign_id=str(m.campaign_id), filename=m.filename, mime_type=m.mime_type,
                    size_bytes=m.size_bytes, sha256=m.sha256 or "", kind=m.kind)  # type: ignore[arg-type]
    out.create_time.FromDatetime(m.created_at)
    return out


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(json.loads(json.dumps(data, default=str)))  # JSON-safe (ids, times as strings)
    return out


def event(ev: EventRow) -> events_pb2.Event:
    return events_pb2.Event(id=ev.id, type=ev.type, stream=ev.stream, seq=ev.seq, create_time=_stamp(ev.created_at),
                            data=_struct(ev.data))


def event_row(e: Event) -> EventRow:
    return EventRow.of(e)


def webhook_endpoint(ep: WebhookEndpoint) -> wh.WebhookEndpoint:
    return wh.WebhookEndpoint(endpoint_id=str(ep.id), url=ep.url, description=ep.description,
                              event_types=list(ep.event_types), enabled=ep.enabled,
                              disabled_reason=ep.disabled_reason, create_time=_stamp(ep.created_at),
                              update_time=_stamp(ep.updated_at), failing_since=_stamp(ep.failing_since))


def webhook_delivery(v: Any) -> wh.WebhookDelivery:
    d = v.delivery
    out = wh.WebhookDelivery(delivery_id=d.id, endpoint_id=str(d.endpoint_id), event=event(event_row(v.event)),
                             state=d.state)
    if d.state == DeliveryState.PENDING:
        out.next_attempt_time.FromDatetime(d.next_attempt_at)
    for a in v.attempts:
        att = out.attempts.add(status_code=a.status_code, error=a.error, attempt_time=_stamp(a.attempted_at))
        att.latency.FromMilliseconds(a.latency_ms)
    return out


def audit_event(a: AuditEvent) -> aud.AuditEvent:
    return aud.AuditEvent(audit_event_id=a.id, action=a.action, entity_type=a.entity_type, entity_id=a.entity_id,
                          actor=a.actor, description=a.description, extra=_struct(a.extra_data or {}),
                          create_time=_stamp(a.created_at))


def credit_balance(b: Balance) -> crs.CreditBalance:
    return crs.CreditBalance(available=b.available, reserved=b.reserved)


def credit_transaction(t: CreditTransaction) -> crs.CreditTransaction:
    out = crs.CreditTransaction(id=str(t.id), kind=t.kind,  # type: ignore[arg-type]
                                amount=t.amount, campaign_id=str(t.campaign_id) if t.campaign_id else "",
                                description=t.description)
    out.create_time.FromDatetime(t.created_at)
    return out
