"""whago.campaign.v1.WebhookService: protobuf <-> campaign_service.ops.webhooks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import empty_pb2

from campaign_service import auth, convert
from campaign_service.ops import Operations
from campaign_service.ops.webhooks import Created, WebhookInput
from campaign_service.servicers import idem, unwrap
from whago.campaign.v1 import webhook_service_pb2 as wh
from whago.campaign.v1 import webhook_service_pb2_grpc as wh_grpc


def _input(ep: wh.WebhookEndpoint) -> WebhookInput:
    return WebhookInput(url=ep.url.strip(), description=ep.description, event_types=list(ep.event_types),
                        enabled=ep.enabled)


def _created(c: Created) -> wh.CreateWebhookEndpointResponse:
    return wh.CreateWebhookEndpointResponse(endpoint=convert.webhook_endpoint(c.endpoint), secret=c.secret)


class WebhookServicer(wh_grpc.WebhookServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def CreateWebhookEndpoint(self, request: wh.CreateWebhookEndpointRequest,
                              context: grpc.ServicerContext) -> wh.CreateWebhookEndpointResponse:
        spec = _input(request.endpoint)
        out = self.ops.webhooks.create(auth.current_user_id(), spec,
                                       idem(request.request_id, "CreateWebhookEndpoint", _created))
        return unwrap(out, wh.CreateWebhookEndpointResponse, _created)

    def GetWebhookEndpoint(self, request: wh.GetWebhookEndpointRequest,
                           context: grpc.ServicerContext) -> wh.WebhookEndpoint:
        return convert.webhook_endpoint(self.ops.webhooks.get(auth.current_user_id(), request.endpoint_id))

    def ListWebhookEndpoints(self, request: wh.ListWebhookEndpointsRequest,
                             context: grpc.ServicerContext) -> wh.ListWebhookEndpointsResponse:
        page = self.ops.webhooks.list_endpoints(auth.current_user_id(), request.page_size, request.page_token)
        return wh.ListWebhookEndpointsResponse(endpoints=[convert.webhook_endpoint(e) for e in page.items],
                                               next_page_token=page.next_page_token)

    def UpdateWebhookEndpoint(self, request: wh.UpdateWebhookEndpointRequest,
                              context: grpc.ServicerContext) -> wh.WebhookEndpoint:
        e = request.endpoint
        paths = list(request.update_mask.paths) or [  # AIP-134: the populated fields (enabled always)
            p for p, set_ in (("url", e.url), ("description", e.description), ("event_types", e.event_types),
                              ("enabled", True)) if set_]
        ep = self.ops.webhooks.update(auth.current_user_id(), e.endpoint_id, _input(e), paths)
        return convert.webhook_endpoint(ep)

    def DeleteWebhookEndpoint(self, request: wh.DeleteWebhookEndpointRequest,
                              context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.ops.webhooks.delete(auth.current_user_id(), request.endpoint_id)
        return empty_pb2.Empty()

    def RotateWebhookSecret(self, request: wh.RotateWebhookSecretRequest,
                            context: grpc.ServicerContext) -> wh.RotateWebhookSecretResponse:
        grace = request.grace_period.ToTimedelta() if request.HasField("grace_period") else None
        if grace is not None and grace < timedelta(0):
            grace = timedelta(seconds=-1)  # refused by the operation, naming the field
        secret, expires = self.ops.webhooks.rotate_secret(auth.current_user_id(), request.endpoint_id, grace)
        out = wh.RotateWebhookSecretResponse(secret=secret)
        if expires is not None:
            out.previous_secret_expire_time.FromDatetime(expires)
        return out

    def ListWebhookDeliveries(self, request: wh.ListWebhookDeliveriesRequest,
                              context: grpc.ServicerContext) -> wh.ListWebhookDeliveriesResponse:
        page = self.ops.webhooks.list_deliveries(auth.current_user_id(), request.endpoint_id, int(request.state),
                                                 request.page_size, request.page_token)
        return wh.ListWebhookDeliveriesResponse(deliveries=[convert.webhook_delivery(d) for d in page.items],
                                                next_page_token=page.next_page_token)

    def RedeliverEvent(self, request: wh.RedeliverEventRequest, context: grpc.ServicerContext) -> wh.WebhookDelivery:
        return convert.webhook_delivery(self.ops.webhooks.redeliver(auth.current_user_id(), request.endpoint_id,
                                                                    request.event_id))

    def SendTestEvent(self, request: wh.SendTestEventRequest, context: grpc.ServicerContext) -> wh.WebhookDelivery:
        return convert.webhook_delivery(self.ops.webhooks.send_test(auth.current_user_id(), request.endpoint_id))


def add_to_server(server: Any, ops: Operations) -> None:
    wh_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(ops), server)
