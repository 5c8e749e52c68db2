"""whago.campaign.v1.CampaignService: protobuf <-> campaign_service.ops."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, timedelta
from typing import Any

import grpc

from campaign_service import auth, convert, errors, outbox
from campaign_service.ops import Operations
from campaign_service.ops.inputs import CampaignInput, DeleteResult, ImportChunk, mask_paths
from campaign_service.ops.media import MediaDeleted
from campaign_service.ops.preview import PreviewContact
from campaign_service.ops.watch import Snapshot
from campaign_service.relay.payloads import EventRow
from campaign_service.servicers import idem, media_upload, unwrap
from campaign_service.servicers.streams import into_thread
from campaign_service.watch import WatchHub
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import resources_pb2 as res

IMPORT_BACKLOG = 8  # chunks read ahead of the import


def campaign_input(c: res.Campaign) -> CampaignInput:
    return CampaignInput(
        name=c.name, description=c.description, templates=list(c.templates), settings=c.settings,
        chip_ids=list(c.chip_ids),
        schedule_time=c.schedule_time.ToDatetime(tzinfo=UTC) if c.HasField("schedule_time") else None,
        has_settings=c.HasField("settings"))


def delete_response(r: DeleteResult) -> cs.DeleteCampaignResponse:
    return cs.DeleteCampaignResponse(campaign_id=r.campaign_id, deleted_contacts=r.deleted_contacts,
                                     deleted_messages=r.deleted_messages, deleted_media=r.deleted_media,
                                     revoked_jobs=r.revoked_jobs, deleted_media_files=r.deleted_media_files)


class CampaignServicer(cs_grpc.CampaignServiceServicer):
    def __init__(self, ops: Operations, hub: WatchHub) -> None:
        self.ops = ops
        self.hub = hub
        self._responses: OrderedDict[int, cs.WatchCampaignResponse] = OrderedDict()  # event loop only

    def CreateCampaign(self, request: cs.CreateCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        uid = auth.current_user_id()
        out = self.ops.campaigns.create_campaign(uid, campaign_input(request.campaign),
                                                 idem(request.request_id, "CreateCampaign", convert.campaign))
        return unwrap(out, res.Campaign, convert.campaign)

    async def GetCampaign(self, request: cs.GetCampaignRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> res.Campaign:
        """On the event loop, not the RPC thread pool (campaign_service.db.aio)."""
        return convert.campaign_view(await self.ops.campaigns.get_campaign(auth.current_user_id(),
                                                                           request.campaign_id))

    async def ListCampaigns(self, request: cs.ListCampaignsRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> cs.ListCampaignsResponse:
        """On the event loop, like GetCampaign."""
        page = await self.ops.campaigns.list_campaigns(auth.current_user_id(), request.state, request.page_size,
                                                       request.page_token)
        out = cs.ListCampaignsResponse(next_page_token=page.next_page_token)
        convert.campaign_views_into(page.items, out.campaigns)
        return out

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

    async def ImportContacts(self, request_iterator: AsyncIterator[cs.ImportContactsRequest],
                             context: grpc.aio.ServicerContext[Any, Any]) -> cs.ImportContactsResponse:
        """The upload feeds the import running in a thread, one transaction (see streams.py)."""
        uid = auth.current_user_id()

        def run(requests: Iterator[cs.ImportContactsRequest]) -> Any:
            return self.ops.contacts.import_contacts(
                uid, (ImportChunk(r.campaign_id, r.contacts, r.default_region) for r in requests))

        r = await into_thread(request_iterator, run, backlog=IMPORT_BACKLOG, nothing_kept="nothing was imported")
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

    # -- media (sniffed, deduplicated, chunked: servicers/media_upload.py, ops/media.py) ----------------
    async def UploadMediaChunks(self, request_iterator: AsyncIterator[cs.UploadMediaChunksRequest],
                                context: grpc.aio.ServicerContext[Any, Any]) -> res.Media:
        return await media_upload.upload_media_chunks(self.ops, request_iterator, context)

    def DeleteMedia(self, request: cs.DeleteMediaRequest, context: grpc.ServicerContext) -> cs.DeleteMediaResponse:
        def encode(r: MediaDeleted) -> cs.DeleteMediaResponse:
            return cs.DeleteMediaResponse(media_id=r.media_id, file_deleted=r.file_deleted)

        out = self.ops.media.delete_media(auth.current_user_id(), request.campaign_id, request.media_id,
                                          idem(request.request_id, "DeleteMedia", encode))
        return unwrap(out, cs.DeleteMediaResponse, encode)
    # -- end media

    def ListCampaignMedia(self, request: cs.ListCampaignMediaRequest,
                          context: grpc.ServicerContext) -> cs.ListCampaignMediaResponse:
        items = self.ops.media.list_media(auth.current_user_id(), request.campaign_id)
        return cs.ListCampaignMediaResponse(media=[convert.media(m) for m in items])


    def PreviewMessages(self, request: cs.PreviewMessagesRequest,
                        context: grpc.ServicerContext) -> cs.PreviewMessagesResponse:
        r = self.ops.preview.preview(
            auth.current_user_id(), request.campaign_id, request.count,
            [PreviewContact(c.phone, c.name, dict(c.variables)) for c in request.contacts], request.default_region)
        return cs.PreviewMessagesResponse(
            previews=[cs.MessagePreview(contact_id=p.contact_id, phone=p.phone, template_index=p.template_index,
                                        variant=p.variant, text=p.text, media_id=p.media_id) for p in r.previews],
            distinct_texts=r.distinct_texts, variant_count=r.variant_count)

    def _event_response(self, ev: EventRow) -> cs.WatchCampaignResponse:
        """One message per event for all its watchers (a thousand watchers: one conversion)."""
        out = self._responses.get(ev.id)
        if out is None:
            out = cs.WatchCampaignResponse(event=convert.event(ev))
            self._responses[ev.id] = out
            if len(self._responses) > 1024:
                self._responses.popitem(last=False)
        return out

    async def WatchCampaign(self, request: cs.WatchCampaignRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[cs.WatchCampaignResponse]:
        """Snapshot, then the campaign's events from the hub; a coroutine, so no thread per watcher."""
        uid = auth.current_user_id()
        if request.after_seq < 0:
            raise errors.InvalidArgument([("after_seq", "must not be negative")])
        loop = asyncio.get_running_loop()
        snap = await loop.run_in_executor(None, self.ops.watch.snapshot, uid, request.campaign_id)
        yield cs.WatchCampaignResponse(snapshot=snapshot(snap))
        after = request.after_seq if request.after_seq else snap.seq
        if snap.final:
            for ev in await loop.run_in_executor(None, self.ops.watch.events, snap.stream, after, snap.seq):
                yield cs.WatchCampaignResponse(event=convert.event(ev))
            return
        watcher = self.hub.subscribe(snap.stream, after)
        try:
            while True:
                ev = await watcher.next()
                yield self._event_response(ev)
                if ev.type in outbox.FINAL_CAMPAIGN_EVENTS:
                    return
        finally:
            self.hub.unsubscribe(watcher)


def snapshot(s: Snapshot) -> cs.CampaignSnapshot:
    out = cs.CampaignSnapshot(campaign=convert.campaign_view(s.view), seq=s.seq,
                              send_rate_per_minute=round(s.rate_per_minute, 3))
    if s.eta_seconds is not None:
        out.eta.FromTimedelta(timedelta(seconds=round(s.eta_seconds)))
    return out


def add_to_server(server: Any, ops: Operations, hub: WatchHub) -> None:
    cs_grpc.add_CampaignServiceServicer_to_server(CampaignServicer(ops, hub), server)
