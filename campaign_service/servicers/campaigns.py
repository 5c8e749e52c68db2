"""whago.campaign.v1.CampaignService: protobuf <-> campaign_service.ops."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import grpc

from campaign_service import auth, convert, errors
from campaign_service.ops import Operations
from campaign_service.ops.inputs import CampaignInput, DeleteResult, ImportChunk, mask_paths
from campaign_service.servicers import idem, unwrap
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import resources_pb2 as res

#: gRPC's sync server can hand a handler the end of a client stream that was in fact cancelled
#: (RST_STREAM), with the cancellation itself surfacing a moment later. ImportContacts waits this
#: long for it before committing, so a broken upload is never kept as if it were complete.
END_OF_STREAM_GRACE = 0.05


def campaign_input(c: res.Campaign) -> CampaignInput:
    return CampaignInput(
        name=c.name, description=c.description, templates=list(c.templates), settings=c.settings,
        chip_ids=list(c.chip_ids),
        schedule_time=c.schedule_time.ToDatetime(tzinfo=UTC) if c.HasField("schedule_time") else None,
        has_settings=c.HasField("settings"))


def delete_response(r: DeleteResult) -> cs.DeleteCampaignResponse:
    return cs.DeleteCampaignResponse(campaign_id=r.campaign_id, deleted_contacts=r.deleted_contacts,
                                     deleted_messages=r.deleted_messages, deleted_media=r.deleted_media,
                                     revoked_jobs=r.revoked_jobs)


class CampaignServicer(cs_grpc.CampaignServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def CreateCampaign(self, request: cs.CreateCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        uid = auth.current_user_id()
        out = self.ops.campaigns.create_campaign(uid, campaign_input(request.campaign),
                                                 idem(request.request_id, "CreateCampaign", convert.campaign))
        return unwrap(out, res.Campaign, convert.campaign)

    def GetCampaign(self, request: cs.GetCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return convert.campaign_view(self.ops.campaigns.get_campaign(auth.current_user_id(), request.campaign_id))

    def ListCampaigns(self, request: cs.ListCampaignsRequest,
                      context: grpc.ServicerContext) -> cs.ListCampaignsResponse:
        page = self.ops.campaigns.list_campaigns(auth.current_user_id(), request.state, request.page_size,
                                                 request.page_token)
        return cs.ListCampaignsResponse(campaigns=[convert.campaign_view(c) for c in page.items],
                                        next_page_token=page.next_page_token)

    def UpdateCampaign(self, request: cs.UpdateCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        uid = auth.current_user_id()
        patch = campaign_input(request.campaign)
        paths = mask_paths(request.update_mask if request.HasField("update_mask") else None, patch,
                           settings_set=request.campaign.HasField("settings"))
        out = self.ops.campaigns.update_campaign(uid, request.campaign.id, patch, paths, request.campaign.etag,
                                                 idem(request.request_id, "UpdateCampaign", convert.campaign))
        return unwrap(out, res.Campaign, convert.campaign)

    def DeleteCampaign(self, request: cs.DeleteCampaignRequest,
                       context: grpc.ServicerContext) -> cs.DeleteCampaignResponse:
        out = self.ops.campaigns.delete_campaign(auth.current_user_id(), request.campaign_id, request.etag,
                                                 idem(request.request_id, "DeleteCampaign", delete_response))
        return unwrap(out, cs.DeleteCampaignResponse, delete_response)

    def _move(self, operation: Callable[..., Any], request: Any, method: str) -> res.Campaign:
        """A lifecycle move (Start/Pause/Resume/Cancel): the caller's campaign, its request id."""
        out = operation(auth.current_user_id(), request.campaign_id,
                        idem(request.request_id, method, convert.campaign))
        return unwrap(out, res.Campaign, convert.campaign)

    def StartCampaign(self, request: cs.StartCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return self._move(self.ops.lifecycle.start_campaign, request, "StartCampaign")

    def PauseCampaign(self, request: cs.PauseCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return self._move(self.ops.lifecycle.pause_campaign, request, "PauseCampaign")

    def ResumeCampaign(self, request: cs.ResumeCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return self._move(self.ops.lifecycle.resume_campaign, request, "ResumeCampaign")

    def CancelCampaign(self, request: cs.CancelCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return self._move(self.ops.lifecycle.cancel_campaign, request, "CancelCampaign")

    def ImportContacts(self, request_iterator: Iterator[cs.ImportContactsRequest],
                       context: grpc.ServicerContext) -> cs.ImportContactsResponse:
        uid = auth.current_user_id()
        ended = threading.Event()  # the RPC terminated: before we answered, that is a cancellation
        if not context.add_callback(ended.set):
            ended.set()

        def chunks() -> Iterator[ImportChunk]:
            try:
                for req in request_iterator:
                    yield ImportChunk(req.campaign_id, req.contacts, req.default_region)
            except grpc.RpcError:
                raise errors.Cancelled("the client ended the stream early; nothing was imported") from None
            # Raised inside the import transaction, so it rolls back.
            if ended.wait(END_OF_STREAM_GRACE) or not context.is_active():
                raise errors.Cancelled("the client cancelled the upload; nothing was imported")

        r = self.ops.contacts.import_contacts(uid, chunks())
        return cs.ImportContactsResponse(
            imported_count=r.imported, duplicate_count=r.duplicates, rejected_count=r.rejected_count,
            total_contacts=r.total_contacts,
            rejected=[cs.RejectedContact(row=x.row, phone=x.phone, reason=x.reason) for x in r.rejected])

    def ListContacts(self, request: cs.ListContactsRequest, context: grpc.ServicerContext) -> cs.ListContactsResponse:
        page = self.ops.contacts.list_contacts(auth.current_user_id(), request.campaign_id, request.page_size,
                                               request.page_token)
        return cs.ListContactsResponse(contacts=[convert.contact(c) for c in page.items],
                                       next_page_token=page.next_page_token)

    def ListCampaignMessages(self, request: cs.ListCampaignMessagesRequest,
                             context: grpc.ServicerContext) -> cs.ListCampaignMessagesResponse:
        page = self.ops.contacts.list_messages(auth.current_user_id(), request.campaign_id, request.state,
                                               request.page_size, request.page_token)
        return cs.ListCampaignMessagesResponse(messages=[convert.message(m) for m in page.items],
                                               next_page_token=page.next_page_token)

    def UploadMedia(self, request: cs.UploadMediaRequest, context: grpc.ServicerContext) -> res.Media:
        out = self.ops.media.upload_media(auth.current_user_id(), request.campaign_id, request.filename,
                                          request.mime_type, request.content,
                                          idem(request.request_id, "UploadMedia", convert.media))
        return unwrap(out, res.Media, convert.media)

    def ListCampaignMedia(self, request: cs.ListCampaignMediaRequest,
                          context: grpc.ServicerContext) -> cs.ListCampaignMediaResponse:
        items = self.ops.media.list_media(auth.current_user_id(), request.campaign_id)
        return cs.ListCampaignMediaResponse(media=[convert.media(m) for m in items])


def add_to_server(server: Any, ops: Operations) -> None:
    cs_grpc.add_CampaignServiceServicer_to_server(CampaignServicer(ops), server)
