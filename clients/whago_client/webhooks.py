"""WebhookService and AuditService for the Python client: `client.webhooks.create(url)`, ...,
`client.list_audit_events(...)`. Same conventions as WhagoClient: plain arguments in, protobuf
resources out, typed errors, pagers for lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2

from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import audit_service_pb2_grpc as aud_grpc
from whago.campaign.v1 import webhook_service_pb2 as wh
from whago.campaign.v1 import webhook_service_pb2_grpc as wh_grpc
from whago_client.inputs import to_timestamp
from whago_client.pager import Pager

Call = Callable[..., Any]  # WhagoClient._call


class Webhooks:
    """The caller's webhook endpoints. Deliveries are signed per Standard Webhooks: verify them
    with the `standardwebhooks` package and the secret that `create` returns."""

    def __init__(self, stub: wh_grpc.WebhookServiceStub, call: Call) -> None:
        self._stub = stub
        self._call = call

    def create(self, url: str, *, event_types: Sequence[str] = (), description: str = "", enabled: bool = True,
               request_id: str = "", timeout: float | None = None) -> wh.CreateWebhookEndpointResponse:
        """Registers an endpoint; the answer's `secret` is shown only here (and by rotate_secret)."""
        ep = wh.WebhookEndpoint(url=url, event_types=list(event_types), description=description, enabled=enabled)
        return self._call(self._stub.CreateWebhookEndpoint,  # type: ignore[no-any-return]
                          wh.CreateWebhookEndpointRequest(endpoint=ep, request_id=request_id), timeout=timeout)

    def get(self, endpoint_id: str, *, timeout: float | None = None) -> wh.WebhookEndpoint:
        return self._call(self._stub.GetWebhookEndpoint,  # type: ignore[no-any-return]
                          wh.GetWebhookEndpointRequest(endpoint_id=endpoint_id), timeout=timeout)

    def list(self, *, page_size: int = 100, timeout: float | None = None) -> Pager[wh.WebhookEndpoint]:
        def fetch(token: str) -> tuple[Sequence[wh.WebhookEndpoint], str]:
            r = self._call(self._stub.ListWebhookEndpoints,
                           wh.ListWebhookEndpointsRequest(page_size=page_size, page_token=token), timeout=timeout)
            return r.endpoints, r.next_page_token
        return Pager(fetch)

    def update(self, endpoint_id: str, *, url: str | None = None, description: str | None = None,
               event_types: Sequence[str] | None = None, enabled: bool | None = None,
               timeout: float | None = None) -> wh.WebhookEndpoint:
        """Changes only the fields given."""
        ep = wh.WebhookEndpoint(endpoint_id=endpoint_id, url=url or "", description=description or "",
                                event_types=list(event_types or ()), enabled=bool(enabled))
        paths = [p for p, v in (("url", url), ("description", description), ("event_types", event_types),
                                ("enabled", enabled)) if v is not None]
        return self._call(self._stub.UpdateWebhookEndpoint,  # type: ignore[no-any-return]
                          wh.UpdateWebhookEndpointRequest(endpoint=ep, update_mask=field_mask_pb2.FieldMask(
                              paths=paths)), timeout=timeout)

    def delete(self, endpoint_id: str, *, timeout: float | None = None) -> None:
        self._call(self._stub.DeleteWebhookEndpoint, wh.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id),
                   timeout=timeout)

    def rotate_secret(self, endpoint_id: str, *, grace: timedelta | None = None,
                      timeout: float | None = None) -> wh.RotateWebhookSecretResponse:
        """A new secret; the old one keeps signing for `grace` (server default 24 h)."""
        req = wh.RotateWebhookSecretRequest(endpoint_id=endpoint_id)
        if grace is not None:
            req.grace_period.CopyFrom(duration_pb2.Duration(seconds=int(grace.total_seconds())))
        return self._call(self._stub.RotateWebhookSecret, req, timeout=timeout)  # type: ignore[no-any-return]

    def list_deliveries(self, endpoint_id: str, *, state: int = 0, page_size: int = 100,
                        timeout: float | None = None) -> Pager[wh.WebhookDelivery]:
        def fetch(token: str) -> tuple[Sequence[wh.WebhookDelivery], str]:
            r = self._call(self._stub.ListWebhookDeliveries, wh.ListWebhookDeliveriesRequest(
                endpoint_id=endpoint_id, state=state, page_size=page_size, page_token=token), timeout=timeout)  # type: ignore[arg-type]
            return r.deliveries, r.next_page_token
        return Pager(fetch)

    def redeliver(self, endpoint_id: str, event_id: int, *, timeout: float | None = None) -> wh.WebhookDelivery:
        return self._call(self._stub.RedeliverEvent,  # type: ignore[no-any-return]
                          wh.RedeliverEventRequest(endpoint_id=endpoint_id, event_id=event_id), timeout=timeout)

    def send_test(self, endpoint_id: str, *, timeout: float | None = None) -> wh.WebhookDelivery:
        return self._call(self._stub.SendTestEvent,  # type: ignore[no-any-return]
                          wh.SendTestEventRequest(endpoint_id=endpoint_id), timeout=timeout)


def list_audit_events(stub: aud_grpc.AuditServiceStub, call: Call, *, entity_type: str = "", entity_id: str = "",
                      action: str = "", start: datetime | None = None, end: datetime | None = None,
                      page_size: int = 100, timeout: float | None = None) -> Pager[aud.AuditEvent]:
    def fetch(token: str) -> tuple[Sequence[aud.AuditEvent], str]:
        req = aud.ListAuditEventsRequest(entity_type=entity_type, entity_id=entity_id, action=action,
                                         page_size=page_size, page_token=token)
        if start is not None:
            req.start_time.CopyFrom(to_timestamp(start))
        if end is not None:
            req.end_time.CopyFrom(to_timestamp(end))
        r = call(stub.ListAuditEvents, req, timeout=timeout)
        return r.audit_events, r.next_page_token
    return Pager(fetch)
