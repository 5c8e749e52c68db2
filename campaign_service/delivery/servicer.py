"""whago.campaign.v1.DeliveryService: protobuf <-> the domain functions of this package, nothing more.

Authentication (service token only; user keys are PERMISSION_DENIED) and the mapping of domain
errors to rich statuses are done by `campaign_service.interceptors`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import json_format, timestamp_pb2

from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.delivery import acks, chips, inbound, lane_waits, leases, media, reports
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2 as res


def _ts(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt)
    return t


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _when(t: timestamp_pb2.Timestamp) -> datetime:
    """Timestamp.ToDatetime(tzinfo=UTC), exactly (to the microsecond, truncated), at a fraction of its
    cost: a report of hundreds of outcomes converts one per outcome."""
    return _EPOCH + timedelta(seconds=t.seconds, microseconds=t.nanos // 1000)


def media_pb(m: leases.MediaInfo) -> res.Media:
    return res.Media(id=str(m.id), campaign_id=str(m.campaign_id), filename=m.filename, mime_type=m.mime_type,
                     size_bytes=m.size_bytes, create_time=_ts(m.created_at), sha256=m.sha256,
                     kind=m.kind)  # type: ignore[arg-type]


def chip_pb(c: chips.ChipRow) -> res.Chip:
    pacing = res.Pacing()
    try:
        json_format.ParseDict(c.pacing or {}, pacing, ignore_unknown_fields=True)
    except json_format.ParseError:
        pacing = res.Pacing()
    return res.Chip(id=str(c.id), display_name=c.display_name, phone=c.phone, waha_base_url=c.waha_base_url,
                    waha_session=c.waha_session, proxy_label=c.proxy_label, state=c.state,  # type: ignore[arg-type]
                    state_reason=c.state_reason, pacing=pacing, create_time=_ts(c.created_at),
                    update_time=_ts(c.updated_at))


def _leased_pb(r: leases.LeaseResult) -> dpb.LeaseMessagesResponse:
    # One lease statement: every message shares its expiry (converted once, not per message).
    expiries = {dt: _ts(dt) for dt in {m.lease_expires_at for m in r.messages}}
    return dpb.LeaseMessagesResponse(
        messages=[dpb.LeasedMessage(
            message_id=str(m.message_id), chat_id=m.chat_id, phone=m.phone, text=m.text,
            media=media_pb(m.media) if m.media is not None else None,
            waha_message_id=m.waha_message_id or "", attempts=m.attempts,
            lease_expire_time=expiries[m.lease_expires_at],
            attempt_waha_message_id=m.attempt_waha_message_id or "", verify_number=m.verify_number,
            not_on_whatsapp=m.not_on_whatsapp) for m in r.messages],
        campaign_state=r.campaign_state,  # type: ignore[arg-type]
        epoch=r.epoch, remaining=r.remaining)


class DeliveryServicer(dgrpc.DeliveryServiceServicer):
    """The internal API the dispatcher's lanes call."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def LeaseMessages(self, request: dpb.LeaseMessagesRequest, context: grpc.ServicerContext
                      ) -> dpb.LeaseMessagesResponse:
        return _leased_pb(leases.lease_messages(
            self.db, request.campaign_id, request.chip_id, request.epoch, request.max_messages,
            request.lease_seconds, request.lease_owner, request.waha_message_ids, request.reclaim_owners))

    def LeaseLanes(self, request: dpb.LeaseLanesRequest, context: grpc.ServicerContext) -> dpb.LeaseLanesResponse:
        out = leases.lease_lanes(self.db, [leases.LaneLease(
            r.campaign_id, r.chip_id, r.epoch, r.max_messages, r.lease_seconds, r.lease_owner, r.waha_message_ids,
            r.reclaim_owners) for r in request.leases])
        return dpb.LeaseLanesResponse(leases=[_leased_pb(r) for r in out])

    def ReportDeliveries(self, request: dpb.ReportDeliveriesRequest, context: grpc.ServicerContext
                         ) -> dpb.ReportDeliveriesResponse:
        parse = reports.parse_message_id
        items = [reports.Report(  # positional (message_id, outcome, waha id, reason, time, checked): hundreds per call
            parse(r.message_id, i), int(r.outcome), r.waha_message_id, r.failure_reason,
            _when(r.time) if r.HasField("time") else None,
            (r.number_exists, r.checked_chat_id) if r.number_checked else None)
            for i, r in enumerate(request.reports)]
        out = reports.report_deliveries(self.db, request.campaign_id, items)
        return dpb.ReportDeliveriesResponse(campaign_state=out.campaign_state,  # type: ignore[arg-type]
                                            epoch=out.epoch)

    def ReportChipState(self, request: dpb.ReportChipStateRequest, context: grpc.ServicerContext
                        ) -> dpb.ReportChipStateResponse:
        out = chips.report_chip_state(self.db, request.chip_id, int(request.state), request.reason)
        return dpb.ReportChipStateResponse(chip=chip_pb(out.chip),
                                           redistributed_campaign_ids=out.redistributed_campaign_ids,
                                           paused_campaign_ids=out.paused_campaign_ids)

    def GetMediaContent(self, request: dpb.GetMediaContentRequest, context: grpc.ServicerContext
                        ) -> dpb.GetMediaContentResponse:
        info, content = media.get_media_content(self.db, self.settings.media_dir, request.media_id,
                                                request.offset, request.max_bytes)
        return dpb.GetMediaContentResponse(media=media_pb(info), content=content)

    def ReportLaneWait(self, request: dpb.ReportLaneWaitRequest, context: grpc.ServicerContext
                       ) -> dpb.ReportLaneWaitResponse:
        out = lane_waits.report_lane_wait(
            self.db, request.campaign_id, request.chip_id, request.epoch,
            request.resume_time.ToDatetime(tzinfo=UTC) if request.HasField("resume_time") else None, request.reason)
        return dpb.ReportLaneWaitResponse(campaign_state=out.campaign_state,  # type: ignore[arg-type]
                                          epoch=out.epoch, recorded=out.recorded)

    def ReportAcks(self, request: dpb.ReportAcksRequest, context: grpc.ServicerContext) -> dpb.ReportAcksResponse:
        out = acks.report_acks(self.db, [
            acks.Ack(a.waha_message_id, int(a.outcome), a.time.ToDatetime(tzinfo=UTC) if a.HasField("time") else None)
            for a in request.acks])
        return dpb.ReportAcksResponse(matched=out.matched, unmatched=out.unmatched)

    def ReportInboundMessages(self, request: dpb.ReportInboundMessagesRequest, context: grpc.ServicerContext
                              ) -> dpb.ReportInboundMessagesResponse:  # suppression
        out = inbound.report_inbound(self.db, self.settings, [
            inbound.Inbound(m.session, m.chip_phone, m.sender, m.text, m.waha_message_id,
                            m.time.ToDatetime(tzinfo=UTC) if m.HasField("time") else None)
            for m in request.messages])
        return dpb.ReportInboundMessagesResponse(opted_out=out.opted_out, duplicates=out.duplicates,
                                                 ignored=out.ignored, replies=[
            dpb.OptOutReply(chip_id=r.lane.chip_id, waha_base_url=r.lane.waha_base_url,
                            waha_session=r.lane.waha_session, waha_api_key=r.lane.waha_api_key,
                            pacing=r.lane.pacing, chat_id=r.chat_id, text=r.text, reply_id=r.reply_id)
            for r in out.replies])


def add_to_server(server: grpc.aio.Server, db: Database, settings: Settings) -> None:
    """Register DeliveryService on the campaign service's gRPC server."""
    dgrpc.add_DeliveryServiceServicer_to_server(DeliveryServicer(db, settings), server)
