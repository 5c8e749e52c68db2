"""WebhookService for the Python client: `client.webhooks.create(url)`, ... Same conventions as
WhagoClient: plain arguments in, protobuf resources out, typed errors, pagers for lists. The requests
come from `whago_client.inputs`, shared with `whago_client.aio.AsyncWebhooks`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from whago.campaign.v1 import webhook_service_pb2 as wh
from whago.campaign.v1 import webhook_service_pb2_grpc as wh_grpc
from whago_client.inputs import (
    Listing,
    PageResponse,
    deliveries_listing,
    endpoints_listing,
    rotate_secret_request,
    webhook_create_request,
    webhook_update_request,
)
from whago_client.pager import Pager

Req = TypeVar("Req")
PageResp = TypeVar("PageResp", bound=PageResponse)
T = TypeVar("T")


class Caller(Protocol):
    """What Webhooks needs of WhagoClient: its unary call (auth, deadline, typed errors) and pager."""

    def _call(self, method: Any, request: Any, *, timeout: float | None) -> Any: ...

    def _pager(self, method: Any, listing: Listing[Req, PageResp, T], timeout: float | None) -> Pager[T]: ...


class Webhooks:
    """The caller's webhook endpoints. Deliveries are signed per Standard Webhooks: verify them
    with the `standardwebhooks` package and the secret that `create` returns."""

    def __init__(self, stub: wh_grpc.WebhookServiceStub, client: Caller) -> None:
        self._stub = stub
        self._client = client

    def create(self, url: str, *, event_types: Sequence[str] = (), description: str = "", enabled: bool = True,
               request_id: str = "", timeout: float | None = None) -> wh.CreateWebhookEndpointResponse:
        """Registers an endpoint; the answer's `secret` is shown only here (and by rotate_secret)."""
        req = webhook_create_request(url, event_types, description, enabled, request_id)
        return self._client._call(self._stub.CreateWebhookEndpoint, req, timeout=timeout)  # type: ignore[no-any-return]

    def get(self, endpoint_id: str, *, timeout: float | None = None) -> wh.WebhookEndpoint:
        return self._client._call(self._stub.GetWebhookEndpoint,  # type: ignore[no-any-return]
                                  wh.GetWebhookEndpointRequest(endpoint_id=endpoint_id), timeout=timeout)

    def list(self, *, page_size: int = 100, timeout: float | None = None) -> Pager[wh.WebhookEndpoint]:
        return self._client._pager(self._stub.ListWebhookEndpoints, endpoints_listing(page_size), timeout)

    def update(self, endpoint_id: str, *, url: str | None = None, description: str | None = None,
               event_types: Sequence[str] | None = None, enabled: bool | None = None,
               timeout: float | None = None) -> wh.WebhookEndpoint:
        """Changes only the fields given."""
        req = webhook_update_request(endpoint_id, url=url, description=description, event_types=event_types,
                                     enabled=enabled)
        return self._client._call(self._stub.UpdateWebhookEndpoint, req, timeout=timeout)  # type: ignore[no-any-return]

    def delete(self, endpoint_id: str, *, timeout: float | None = None) -> None:
        self._client._call(self._stub.DeleteWebhookEndpoint, wh.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id),
                           timeout=timeout)

    def rotate_secret(self, endpoint_id: str, *, grace: timedelta | None = None,
                      timeout: float | None = None) -> wh.RotateWebhookSecretResponse:
        """A new secret; the old one keeps signing for `grace` (server default 24 h)."""
        return self._client._call(self._stub.RotateWebhookSecret,  # type: ignore[no-any-return]
                                  rotate_secret_request(endpoint_id, grace), timeout=timeout)

    def list_deliveries(self, endpoint_id: str, *, state: int = 0, page_size: int = 100,
                        timeout: float | None = None) -> Pager[wh.WebhookDelivery]:
        return self._client._pager(self._stub.ListWebhookDeliveries,
                                   deliveries_listing(endpoint_id, state, page_size), timeout)

    def redeliver(self, endpoint_id: str, event_id: int, *, timeout: float | None = None) -> wh.WebhookDelivery:
        return self._client._call(self._stub.RedeliverEvent,  # type: ignore[no-any-return]
                                  wh.RedeliverEventRequest(endpoint_id=endpoint_id, event_id=event_id),
                                  timeout=timeout)

    def send_test(self, endpoint_id: str, *, timeout: float | None = None) -> wh.WebhookDelivery:
        return self._client._call(self._stub.SendTestEvent,  # type: ignore[no-any-return]
                                  wh.SendTestEventRequest(endpoint_id=endpoint_id), timeout=timeout)
