"""whago.campaign.v1.AuditService: protobuf <-> campaign_service.ops.audit."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import grpc

from campaign_service import auth, convert
from campaign_service.ops import Operations
from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import audit_service_pb2_grpc as aud_grpc


class AuditServicer(aud_grpc.AuditServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def ListAuditEvents(self, request: aud.ListAuditEventsRequest,
                        context: grpc.ServicerContext) -> aud.ListAuditEventsResponse:
        page = self.ops.audit.list_entries(
            auth.current_user_id(), entity_type=request.entity_type, entity_id=request.entity_id,
            action=request.action,
            start=request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None,
            end=request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None,
            page_size=request.page_size, page_token=request.page_token)
        return aud.ListAuditEventsResponse(audit_events=[convert.audit_event(a) for a in page.items],
                                           next_page_token=page.next_page_token)


def add_to_server(server: Any, ops: Operations) -> None:
    aud_grpc.add_AuditServiceServicer_to_server(AuditServicer(ops), server)
