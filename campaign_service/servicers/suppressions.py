"""whago.campaign.v1.SuppressionService: protobuf <-> campaign_service.ops.suppressions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from campaign_service import auth, errors
from campaign_service.ops import Operations
from campaign_service.ops.suppressions import MAX_IMPORT_BYTES, MAX_IMPORT_ROWS
from campaign_service.repository.suppressions import OptOutSettingsRow, SuppressionRow
from whago.campaign.v1 import suppression_service_pb2 as sps
from whago.campaign.v1 import suppression_service_pb2_grpc as sps_grpc


def _ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC))
    return t


def suppression_pb(r: SuppressionRow) -> sps.Suppression:
    return sps.Suppression(phone=r.phone, source=r.source, note=r.note,  # type: ignore[arg-type]
                           create_time=_ts(r.created_at))


def settings_pb(r: OptOutSettingsRow) -> sps.OptOutSettings:
    return sps.OptOutSettings(words=r.words, confirmation_text=r.confirmation_text, update_time=_ts(r.updated_at))


class SuppressionServicer(sps_grpc.SuppressionServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def AddSuppression(self, request: sps.AddSuppressionRequest, context: grpc.ServicerContext) -> sps.Suppression:
        return suppression_pb(self.ops.suppressions.add(auth.current_user_id(), request.phone, request.note))

    def ListSuppressions(self, request: sps.ListSuppressionsRequest, context: grpc.ServicerContext
                         ) -> sps.ListSuppressionsResponse:
        rows, token = self.ops.suppressions.list(auth.current_user_id(), request.page_size, request.page_token,
                                                 request.query, int(request.source))
        return sps.ListSuppressionsResponse(suppressions=[suppression_pb(r) for r in rows], next_page_token=token)

    def RemoveSuppression(self, request: sps.RemoveSuppressionRequest, context: grpc.ServicerContext
                          ) -> empty_pb2.Empty:
        self.ops.suppressions.remove(auth.current_user_id(), request.phone)
        return empty_pb2.Empty()

    async def ImportSuppressions(self, request_iterator: AsyncIterator[sps.ImportSuppressionsRequest],
                                 context: grpc.aio.ServicerContext[Any, Any]) -> sps.ImportSuppressionsResponse:
        """The stream is read whole (bounded), then imported in one transaction on a thread."""
        uid = auth.current_user_id()
        content = bytearray()
        rows: list[tuple[str, str]] = []
        async for req in request_iterator:
            content += req.csv_content
            rows.extend((r.phone, r.note) for r in req.rows)
            if len(content) > MAX_IMPORT_BYTES:
                raise errors.InvalidArgument([("csv_content", f"at most {MAX_IMPORT_BYTES} bytes")])
            if len(rows) > MAX_IMPORT_ROWS:
                raise errors.InvalidArgument([("rows", f"at most {MAX_IMPORT_ROWS} rows per import")])
        loop = asyncio.get_running_loop()
        r = await loop.run_in_executor(None, self.ops.suppressions.import_rows, uid, bytes(content), rows)
        return sps.ImportSuppressionsResponse(added=r.added, already_suppressed=r.already, total_rows=r.total_rows)

    def GetOptOutSettings(self, request: sps.GetOptOutSettingsRequest, context: grpc.ServicerContext
                          ) -> sps.OptOutSettings:
        return settings_pb(self.ops.suppressions.get_settings(auth.current_user_id()))

    def UpdateOptOutSettings(self, request: sps.UpdateOptOutSettingsRequest, context: grpc.ServicerContext
                             ) -> sps.OptOutSettings:
        paths = set(request.update_mask.paths) if request.HasField("update_mask") else set()
        unknown = paths - {"words", "confirmation_text"}
        if unknown:
            raise errors.InvalidArgument([("update_mask", f"unknown field(s): {', '.join(sorted(unknown))}")])
        everything = not paths
        s = request.settings
        out = self.ops.suppressions.update_settings(
            auth.current_user_id(), list(s.words) if everything or "words" in paths else None,
            s.confirmation_text if everything or "confirmation_text" in paths else None)
        return settings_pb(out)


def add_to_server(server: Any, ops: Operations) -> None:
    sps_grpc.add_SuppressionServiceServicer_to_server(SuppressionServicer(ops), server)
