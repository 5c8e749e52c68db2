"""Webhook endpoints of a user (WebhookService): registration behind the SSRF guard, secrets and
their rotation, the delivery history, redelivery and test events."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from campaign_service import audit, errors, outbox, pagination
from campaign_service.db.models import Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from campaign_service.ids import parse_uuid
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import Idem, Page, Replayed
from campaign_service.relay import signing
from campaign_service.states import DeliveryState
from campaign_service.urlguard import RefusedURL, URLGuard, parse_allowlist

log = logging.getLogger("campaign_service.webhooks")

MAX_DESCRIPTION = 500
MAX_EVENT_TYPES = 32
MAX_ENDPOINTS = 20
DEFAULT_GRACE = timedelta(hours=24)
MAX_GRACE = timedelta(days=7)
UPDATABLE = ("url", "description", "event_types", "enabled")


@dataclass(frozen=True)
class WebhookInput:
    url: str = ""
    description: str = ""
    event_types: list[str] = field(default_factory=list)
    enabled: bool = True


@dataclass(frozen=True)
class Created:
    endpoint: WebhookEndpoint
    secret: str


@dataclass(frozen=True)
class DeliveryView:
    delivery: WebhookDelivery
    event: Event
    attempts: list[WebhookAttempt]


class WebhookOps(OpsBase):
    """Create/Get/List/Update/Delete endpoints, RotateSecret, ListDeliveries, Redeliver, SendTest."""

    @property
    def guard(self) -> URLGuard:
        return URLGuard(parse_allowlist(self.settings.webhook_allow_cidrs))

    def _validate(self, spec: WebhookInput, paths: tuple[str, ...] | list[str]) -> None:
        v: list[tuple[str, str]] = []
        if "url" in paths:
            try:
                self.guard.check(spec.url)
            except RefusedURL as exc:
                v.append(("endpoint.url", str(exc)))
        if "description" in paths and len(spec.description) > MAX_DESCRIPTION:
            v.append(("endpoint.description", f"at most {MAX_DESCRIPTION} characters"))
        if "event_types" in paths:
            if len(spec.event_types) > MAX_EVENT_TYPES:
                v.append(("endpoint.event_types", f"at most {MAX_EVENT_TYPES} entries"))
            for i, t in enumerate(spec.event_types[:MAX_EVENT_TYPES]):
                if t not in outbox.EVENT_TYPES:
                    v.append((f"endpoint.event_types[{i}]", f"unknown event type {t[:80]!r}; known: "
                              + ", ".join(sorted(outbox.EVENT_TYPES))))
        if v:
            raise errors.InvalidArgument(v)

    @staticmethod
    def _endpoint(s: Session, user_id: uuid.UUID, endpoint_id: uuid.UUID, lock: bool = False) -> WebhookEndpoint:
        q = select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.user_id == user_id)
        ep = s.execute(q.with_for_update() if lock else q).scalar_one_or_none()
        if ep is None:
            raise errors.NotFound("webhook endpoint", str(endpoint_id))
        return ep

    @staticmethod
    def _audit(s: Session, ep: WebhookEndpoint, action: str, description: str, **extra: Any) -> None:
        audit.record(s, user_id=ep.user_id, action=action, entity_type="webhook", entity_id=str(ep.id),
                     description=description, extra_data={"url": ep.url, **extra})

    def create(self, user_id: uuid.UUID, spec: WebhookInput, idem: Idem | None = None) -> Created | Replayed:
        self._validate(spec, UPDATABLE)
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            count = s.execute(select(func.count()).select_from(WebhookEndpoint)
                              .where(WebhookEndpoint.user_id == user_id)).scalar_one()
            if count >= MAX_ENDPOINTS:
                raise errors.ResourceExhausted(f"at most {MAX_ENDPOINTS} webhook endpoints per user",
                                               [errors.error_info("TOO_MANY_ENDPOINTS")])
            ep = WebhookEndpoint(id=uuid.uuid4(), user_id=user_id, url=spec.url, description=spec.description,
                                 event_types=list(dict.fromkeys(spec.event_types)), enabled=spec.enabled,
                                 secret=signing.new_secret())
            s.add(ep)
            s.flush()
            s.refresh(ep)
            self._audit(s, ep, "webhook.create", f"Webhook endpoint {ep.url} created.",
                        event_types=ep.event_types, enabled=ep.enabled)
            out = Created(ep, ep.secret)
            self._remember(s, user_id, idem, out)
        log.info("webhook=%s created for user %s", ep.id, user_id)
        return out

    def get(self, user_id: uuid.UUID, endpoint_id: str) -> WebhookEndpoint:
        eid = parse_uuid(endpoint_id, "endpoint_id")
        with self.db.session() as s:
            return self._endpoint(s, user_id, eid)

    def list_endpoints(self, user_id: uuid.UUID, page_size: int, page_token: str) -> Page:
        n = pagination.page_size(page_size)
        after = pagination.decode_created_keyset(page_token, "webhooks", "")
        q = select(WebhookEndpoint).where(WebhookEndpoint.user_id == user_id)
        if after is not None:
            q = q.where(func.row(WebhookEndpoint.created_at, WebhookEndpoint.id) < func.row(*after))
        q = q.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc()).limit(n + 1)
        with self.db.session() as s:
            rows = list(s.execute(q).scalars())
        token = ""
        if len(rows) > n:
            rows = rows[:n]
            token = pagination.encode("webhooks", "", [rows[-1].created_at.isoformat(), str(rows[-1].id)])
        return Page(rows, token)

    def update(self, user_id: uuid.UUID, endpoint_id: str, spec: WebhookInput, paths: list[str]) -> WebhookEndpoint:
        eid = parse_uuid(endpoint_id, "endpoint.endpoint_id")
        unknown = [p for p in paths if p not in UPDATABLE]
        if unknown:
            raise errors.InvalidArgument([("update_mask", f"unknown or read-only path {p!r}; updatable: "
                                           + ", ".join(UPDATABLE)) for p in unknown])
        self._validate(spec, paths)
        with self.db.transaction() as s:
            ep = self._endpoint(s, user_id, eid, lock=True)
            if "url" in paths:
                ep.url = spec.url
            if "description" in paths:
                ep.description = spec.description
            if "event_types" in paths:
                ep.event_types = list(dict.fromkeys(spec.event_types))
            if "enabled" in paths:
                if spec.enabled and not ep.enabled:
                    ep.failing_since = None
                    ep.disabled_reason = ""
                ep.enabled = spec.enabled
            ep.version += 1
            ep.updated_at = datetime.now(UTC)
            self._audit(s, ep, "webhook.update", f"Webhook endpoint {ep.url} updated.", fields=sorted(paths),
                        enabled=ep.enabled)
        return ep

    def delete(self, user_id: uuid.UUID, endpoint_id: str) -> None:
        eid = parse_uuid(endpoint_id, "endpoint_id")
        with self.db.transaction() as s:
            ep = self._endpoint(s, user_id, eid, lock=True)
            self._audit(s, ep, "webhook.delete", f"Webhook endpoint {ep.url} deleted.")
            s.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == eid))

    def rotate_secret(self, user_id: uuid.UUID, endpoint_id: str, grace: timedelta | None
                      ) -> tuple[str, datetime | None]:
        eid = parse_uuid(endpoint_id, "endpoint_id")
        grace = DEFAULT_GRACE if grace is None else grace
        if grace < timedelta(0) or grace > MAX_GRACE:
            raise errors.InvalidArgument([("grace_period", "must be between 0 and 7 days")])
        with self.db.transaction() as s:
            ep = self._endpoint(s, user_id, eid, lock=True)
            expires = datetime.now(UTC) + grace if grace > timedelta(0) else None
            ep.previous_secret = ep.secret if expires is not None else None
            ep.previous_secret_expires_at = expires
            ep.secret = signing.new_secret()
            ep.version += 1
            ep.updated_at = datetime.now(UTC)
            self._audit(s, ep, "webhook.rotate_secret", f"Signing secret of {ep.url} rotated.",
                        grace_seconds=int(grace.total_seconds()))
            return ep.secret, expires

    def list_deliveries(self, user_id: uuid.UUID, endpoint_id: str, state: int, page_size: int,
                        page_token: str) -> Page:
        eid = parse_uuid(endpoint_id, "endpoint_id")
        if state not in DeliveryState._value2member_map_:
            raise errors.InvalidArgument([("state", "unknown delivery state")])
        n = pagination.page_size(page_size)
        cursor = pagination.decode(page_token, "deliveries", f"{eid}:{state}")
        q = select(WebhookDelivery, Event).join(Event, Event.id == WebhookDelivery.event_id).where(
            WebhookDelivery.endpoint_id == eid)
        if state:
            q = q.where(WebhookDelivery.state == state)
        if cursor:
            if not isinstance(cursor[0], int):
                raise errors.InvalidArgument([("page_token", "malformed page token")])
            q = q.where(WebhookDelivery.id < cursor[0])
        q = q.order_by(WebhookDelivery.id.desc()).limit(n + 1)
        with self.db.session() as s:
            self._endpoint(s, user_id, eid)
            rows = list(s.execute(q).all())
            more = len(rows) > n
            rows = rows[:n]
            ids = [d.id for d, _ in rows]
            attempts: dict[int, list[WebhookAttempt]] = {i: [] for i in ids}
            if ids:
                for a in s.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids))
                                   .order_by(WebhookAttempt.id)).scalars():
                    attempts[a.delivery_id].append(a)
        items = [DeliveryView(d, e, attempts[d.id]) for d, e in rows]
        token = pagination.encode("deliveries", f"{eid}:{state}", [ids[-1]]) if more and ids else ""
        return Page(items, token)

    @staticmethod
    def _check_enabled(ep: WebhookEndpoint) -> None:
        if not ep.enabled:
            raise errors.FailedPrecondition("ENDPOINT_DISABLED", "the endpoint is disabled: enable it first",
                                            {"endpoint_id": str(ep.id)})

    def _queue(self, s: Session, ep: WebhookEndpoint, event: Event) -> DeliveryView:
        self._check_enabled(ep)
        d = WebhookDelivery(endpoint_id=ep.id, event_id=event.id, stream=event.stream,
                            state=int(DeliveryState.PENDING))
        s.add(d)
        s.flush()
        s.refresh(d)
        s.execute(text(f"SELECT pg_notify('{outbox.NOTIFY_CHANNEL}', '')"))
        return DeliveryView(d, event, [])

    def redeliver(self, user_id: uuid.UUID, endpoint_id: str, event_id: int) -> DeliveryView:
        eid = parse_uuid(endpoint_id, "endpoint_id")
        if event_id <= 0:
            raise errors.InvalidArgument([("event_id", "required")])
        with self.db.transaction() as s:
            ep = self._endpoint(s, user_id, eid)
            ev = s.execute(select(Event).where(Event.id == event_id, Event.user_id == user_id)).scalar_one_or_none()
            if ev is None:
                raise errors.NotFound("event", str(event_id))
            out = self._queue(s, ep, ev)
            self._audit(s, ep, "webhook.redeliver", f"Event {event_id} queued again for {ep.url}.",
                        event_id=event_id)
        return out

    def send_test(self, user_id: uuid.UUID, endpoint_id: str) -> DeliveryView:
        eid = parse_uuid(endpoint_id, "endpoint_id")
        with self.db.transaction() as s:
            ep = self._endpoint(s, user_id, eid)
            self._check_enabled(ep)
            event_id = outbox.emit(s, user_id=user_id, stream=outbox.webhook_stream(eid), type=outbox.WEBHOOK_TEST,
                                   data={"endpoint_id": str(eid), "user_id": str(user_id),
                                         "message": "test event from WHAGO"})
            ev = s.execute(select(Event).where(Event.id == event_id)).scalar_one()
            out = self._queue(s, ep, ev)
            self._audit(s, ep, "webhook.test", f"Test event {event_id} sent to {ep.url}.", event_id=event_id)
        return out

