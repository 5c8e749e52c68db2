"""asyncio client for the WHAGO API on `grpc.aio`: `AsyncWhagoClient`, the twin of `WhagoClient`.

Same methods, arguments and results (coroutines here), the same typed `errors`, the same channel
service config (gRPC's own retries, `RetryPolicy`), a deadline on every call; lists are
`AsyncPager`s (`async for`), `watch()` is an async iterator over WatchCampaign that reconnects
after UNAVAILABLE from the last event seen. Requests are built by `whago_client.inputs`, shared
with the sync client, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, Self, TypeVar

import grpc
import grpc.aio

from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import audit_service_pb2_grpc as aud_grpc
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import credit_service_pb2_grpc as crs_grpc
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh
from whago.campaign.v1 import webhook_service_pb2_grpc as wh_grpc
from whago_client.client import DEFAULT_TARGET, IMPORT_TIMEOUT, auth_metadata, channel_options
from whago_client.errors import from_rpc_error
from whago_client.inputs import (
    FINAL_CAMPAIGN_STATES,
    CampaignStateLike,
    ContactRow,
    CreditKindLike,
    Listing,
    MessageStateLike,
    PageResponse,
    audit_events_listing,
    campaigns_listing,
    check_wait,
    chips_listing,
    contacts_listing,
    create_campaign_request,
    credit_transactions_listing,
    deliveries_listing,
    endpoints_listing,
    import_requests,
    media_upload,
    messages_listing,
    progress_key,
    register_chip_request,
    rotate_secret_request,
    to_contact_input,
    update_campaign_request,
    update_chip_request,
    wanted_states,
    webhook_create_request,
    webhook_update_request,
)
from whago_client.inputs import request_id as fresh_request_id
from whago_client.retry import RetryPolicy
from whago_client.watch import RECONNECT_CODES

__all__ = ["AsyncPager", "AsyncWebhooks", "AsyncWhagoClient"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
PageResp = TypeVar("PageResp", bound=PageResponse)
T = TypeVar("T")

#: Fetches one page: given a page token ("" first), the page's items and the next token ("" last).
AsyncPageFetcher = Callable[[str], Awaitable[tuple[Sequence[T], str]]]


class AsyncPager(Generic[T]):
    """`async for` over every item of a paginated List call, fetching a page only when the previous
    one is used up (like `Pager`); each new iteration starts from the first page."""

    def __init__(self, fetch: AsyncPageFetcher[T]) -> None:
        self._fetch = fetch

    async def pages(self) -> AsyncIterator[list[T]]:
        """The pages themselves, for callers that batch their own work per page."""
        token = ""
        seen: set[str] = set()
        while True:
            items, next_token = await self._fetch(token)
            yield list(items)
            if not next_token:
                return
            if next_token in seen:  # a server handing back a token it already gave would loop forever
                raise RuntimeError(f"server repeated page token {next_token!r}")
            seen.add(next_token)
            token = next_token

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.pages():
            for item in page:
                yield item

    async def first(self) -> T | None:
        """The first item, or None if there is none (one RPC)."""
        async for item in self:
            return item
        return None

    async def to_list(self) -> list[T]:
        """Every item of every page; only for listings known to be small."""
        return [item async for item in self]

    def __repr__(self) -> str:
        return f"AsyncPager({self._fetch!r})"


async def _async_import_requests(campaign_id: str, rows: AsyncIterable[ContactRow], *, batch_size: int,
                                 default_region: str) -> AsyncIterator[cs.ImportContactsRequest]:
    """`import_requests` for an async source: one chunk of `batch_size` in memory at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    chunk: list[cs.ContactInput] = []
    sent = False
    async for row in rows:
        chunk.append(to_contact_input(row))
        if len(chunk) == batch_size:
            yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=chunk, default_region=default_region)
            chunk, sent = [], True
    if chunk or not sent:  # an empty input still tells the server the campaign (it answers its totals)
        yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=chunk, default_region=default_region)


async def _as_async(it: Iterable[T]) -> AsyncIterator[T]:
    for item in it:
        yield item


class AsyncWhagoClient:
    """asyncio client for CampaignService, ChipService, CreditService, WebhookService, AuditService.

    >>> async with AsyncWhagoClient("127.0.0.1:50051", api_key="...") as client:
    ...     c = await client.create_campaign("Promo", templates=["Hi {{name}}!"])
    ...     await client.import_contacts(c.id, ["+55 11 99999-9999"])
    ...     await client.start_campaign(c.id)
    ...     async for msg in client.watch(c.id):
    ...         print(msg)

    Arguments as for `WhagoClient` (`channel`, when given, is a `grpc.aio.Channel` left open on close).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retry: RetryPolicy | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = auth_metadata(api_key, metadata)
        self._owns_channel = channel is None
        if channel is None:
            options = channel_options(self.retry)
            channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials is not None
                       else grpc.aio.insecure_channel(target, options=options))
        self.channel: grpc.aio.Channel = channel
        self._campaigns = cs_grpc.CampaignServiceStub(channel)
        self._chips = chs_grpc.ChipServiceStub(channel)
        self._credits = crs_grpc.CreditServiceStub(channel)
        self._audit = aud_grpc.AuditServiceStub(channel)
        #: WebhookService: endpoints, secrets, deliveries.
        self.webhooks = AsyncWebhooks(wh_grpc.WebhookServiceStub(channel), self)

    async def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            await self.channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncWhagoClient({self.target!r})"

    # -- plumbing

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, *,
                    timeout: float | None) -> Resp:
        """One unary RPC with auth and an overall deadline (gRPC's retries included); typed errors."""
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout,
                                metadata=self._metadata)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError: code(), details(), trailing_metadata()
            err = from_rpc_error(e)
            raise err from err.__cause__

    def _pager(self, method: grpc.aio.UnaryUnaryMultiCallable[Req, PageResp], listing: Listing[Req, PageResp, T],
               timeout: float | None) -> AsyncPager[T]:
        async def fetch(token: str) -> tuple[Sequence[T], str]:
            resp = await self._call(method, listing.request(token), timeout=timeout)
            return listing.items(resp), resp.next_page_token
        return AsyncPager(fetch)

    # -- campaigns

    async def create_campaign(
        self, name: str, *, description: str = "", templates: Sequence[str | res.MessageTemplate] = (),
        chip_ids: Sequence[str] = (), settings: res.CampaignSettings | None = None,
        schedule_time: datetime | None = None, request_id: str | None = None, timeout: float | None = None,
    ) -> res.Campaign:
        """Create a campaign: DRAFT, or SCHEDULED when `schedule_time` (timezone-aware) is set."""
        req = create_campaign_request(name, description=description, templates=templates, chip_ids=chip_ids,
                                      settings=settings, schedule_time=schedule_time, request_id_=request_id)
        return await self._call(self._campaigns.CreateCampaign, req, timeout=timeout)

    async def get_campaign(self, campaign_id: str, *, timeout: float | None = None) -> res.Campaign:
        return await self._call(self._campaigns.GetCampaign, cs.GetCampaignRequest(campaign_id=campaign_id),
                                timeout=timeout)

    def list_campaigns(self, state: CampaignStateLike | None = None, *, page_size: int = 100,
                       timeout: float | None = None) -> AsyncPager[res.Campaign]:
        """All the caller's campaigns (newest first), optionally only those in `state`."""
        return self._pager(self._campaigns.ListCampaigns, campaigns_listing(state, page_size), timeout)

    async def update_campaign(self, campaign: res.Campaign, update_mask: Sequence[str], *,
                              request_id: str | None = None, timeout: float | None = None) -> res.Campaign:
        """Update the fields named in `update_mask` (`campaign.etag` set: Aborted on a concurrent change)."""
        return await self._call(self._campaigns.UpdateCampaign,
                                update_campaign_request(campaign, update_mask, request_id), timeout=timeout)

    async def delete_campaign(self, campaign_id: str, etag: str = "", *, request_id: str | None = None,
                              timeout: float | None = None) -> cs.DeleteCampaignResponse:
        """Delete a DRAFT, CANCELLED or COMPLETED campaign; returns what was removed."""
        req = cs.DeleteCampaignRequest(campaign_id=campaign_id, etag=etag, request_id=fresh_request_id(request_id))
        return await self._call(self._campaigns.DeleteCampaign, req, timeout=timeout)

    async def start_campaign(self, campaign_id: str, *, request_id: str | None = None,
                             timeout: float | None = None) -> res.Campaign:
        req = cs.StartCampaignRequest(campaign_id=campaign_id, request_id=fresh_request_id(request_id))
        return await self._call(self._campaigns.StartCampaign, req, timeout=timeout)

    async def pause_campaign(self, campaign_id: str, *, request_id: str | None = None,
                             timeout: float | None = None) -> res.Campaign:
        """Returns once no further message of the campaign will reach WAHA."""
        req = cs.PauseCampaignRequest(campaign_id=campaign_id, request_id=fresh_request_id(request_id))
        return await self._call(self._campaigns.PauseCampaign, req, timeout=timeout)

    async def resume_campaign(self, campaign_id: str, *, request_id: str | None = None,
                              timeout: float | None = None) -> res.Campaign:
        req = cs.ResumeCampaignRequest(campaign_id=campaign_id, request_id=fresh_request_id(request_id))
        return await self._call(self._campaigns.ResumeCampaign, req, timeout=timeout)

    async def cancel_campaign(self, campaign_id: str, *, request_id: str | None = None,
                              timeout: float | None = None) -> res.Campaign:
        """Returns once no further message of the campaign will reach WAHA."""
        req = cs.CancelCampaignRequest(campaign_id=campaign_id, request_id=fresh_request_id(request_id))
        return await self._call(self._campaigns.CancelCampaign, req, timeout=timeout)

    async def import_contacts(
        self, campaign_id: str, rows: Iterable[ContactRow] | AsyncIterable[ContactRow], *, batch_size: int = 1000,
        default_region: str = "", timeout: float | None = IMPORT_TIMEOUT,
    ) -> cs.ImportContactsResponse:
        """Stream contacts into a DRAFT/SCHEDULED campaign, `batch_size` per message.

        `rows` may be sync (read on the event loop, one chunk at a time: fine for a file) or async.
        Written message by message, so an exception raised by `rows` cancels the call before the
        stream is half-closed (the server never commits a broken upload) and is re-raised as is.
        Not retried: the stream cannot be replayed.
        """
        requests: AsyncIterator[cs.ImportContactsRequest] = (
            _async_import_requests(campaign_id, rows, batch_size=batch_size, default_region=default_region)
            if isinstance(rows, AsyncIterable)
            else _as_async(import_requests(campaign_id, rows, batch_size=batch_size, default_region=default_region)))
        return await self._stream_call(self._campaigns.ImportContacts, requests, timeout=timeout)

    async def _stream_call(self, method: grpc.aio.StreamUnaryMultiCallable[Req, Resp],
                           requests: AsyncIterator[Req], *, timeout: float | None) -> Resp:
        """One client-streaming RPC written message by message: an exception raised by
        `requests` (or our cancellation) cancels the call before the stream is half-closed, so
        the server never commits a broken stream, and is re-raised as is."""
        call = method(None, timeout=timeout, metadata=self._metadata)  # we write
        try:
            try:
                async for req in requests:
                    await call.write(req)
                await call.done_writing()
            except grpc.RpcError:
                pass  # the call failed while writing: its status comes with the answer below
            except BaseException:  # the source failed, or we were cancelled: never half-close
                call.cancel()
                raise
            return await call
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            raise err from err.__cause__

    def list_contacts(self, campaign_id: str, *, page_size: int = 1000,
                      timeout: float | None = None) -> AsyncPager[res.Contact]:
        return self._pager(self._campaigns.ListContacts, contacts_listing(campaign_id, page_size), timeout)

    def list_messages(self, campaign_id: str, state: MessageStateLike | None = None, *, page_size: int = 1000,
                      timeout: float | None = None) -> AsyncPager[res.CampaignMessage]:
        """The campaign's messages, optionally only those in `state` (e.g. "FAILED")."""
        return self._pager(self._campaigns.ListCampaignMessages, messages_listing(campaign_id, state, page_size),
                           timeout)

    async def upload_media(self, campaign_id: str, source: bytes | str | os.PathLike[str],
                           filename: str | None = None, mime_type: str | None = None, *,
                           request_id: str | None = None, timeout: float | None = None) -> res.Media:
        """Upload a file (path) or raw bytes (see `WhagoClient.upload_media`: one UploadMedia,
        or UploadMediaChunks for a path larger than one chunk, read as it goes)."""
        upload = media_upload(campaign_id, source, filename, mime_type, request_id)
        if isinstance(upload, cs.UploadMediaRequest):
            return await self._call(self._campaigns.UploadMedia, upload, timeout=timeout)
        return await self._stream_call(self._campaigns.UploadMediaChunks, _as_async(upload),
                                       timeout=IMPORT_TIMEOUT if timeout is None else timeout)

    async def delete_media(self, campaign_id: str, media_id: str, *, request_id: str | None = None,
                           timeout: float | None = None) -> cs.DeleteMediaResponse:
        """Delete a media file no template uses (see `WhagoClient.delete_media`)."""
        req = cs.DeleteMediaRequest(campaign_id=campaign_id, media_id=media_id,
                                    request_id=fresh_request_id(request_id))
        return await self._call(self._campaigns.DeleteMedia, req, timeout=timeout)

    async def list_media(self, campaign_id: str, *, timeout: float | None = None) -> list[res.Media]:
        resp = await self._call(self._campaigns.ListCampaignMedia,
                                cs.ListCampaignMediaRequest(campaign_id=campaign_id), timeout=timeout)
        return list(resp.media)

    async def wait_for_state(
        self, campaign_id: str,
        states: CampaignStateLike | Collection[CampaignStateLike] = tuple(FINAL_CAMPAIGN_STATES),
        timeout: float | None = 60.0, poll: float = 0.5, *,
        on_change: Callable[[res.Campaign], None] | None = None,
    ) -> res.Campaign:
        """Poll until the campaign is in one of `states` (see `WhagoClient.wait_for_state`);
        `watch()` follows a campaign without polling."""
        wanted = wanted_states(states)
        give_up = None if timeout is None else time.monotonic() + timeout
        last_key: tuple[int, ...] | None = None
        while True:
            campaign = await self.get_campaign(campaign_id)
            key = progress_key(campaign)
            if on_change is not None and key != last_key:
                on_change(campaign)
            last_key = key
            if check_wait(campaign, wanted, campaign_id, give_up, poll, timeout):
                return campaign
            await asyncio.sleep(poll)

    async def watch(self, campaign_id: str, *, after_seq: int = 0, timeout: float | None = None,
                    reconnects: int = 30) -> AsyncIterator[cs.WatchCampaignResponse]:
        """WatchCampaign: a snapshot, then every event of the campaign until it is final. On UNAVAILABLE
        it reconnects with after_seq = the last event yielded (a fresh snapshot first), so every event
        comes once and in order; `timeout` bounds the whole watch (None: as long as the campaign runs)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, tries = after_seq, 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = self._campaigns.WatchCampaign(cs.WatchCampaignRequest(campaign_id=campaign_id, after_seq=last),
                                                 metadata=self._metadata, timeout=left)
            try:
                async for msg in call:
                    if msg.WhichOneof("kind") == "event":
                        last, tries = msg.event.seq, 0
                    yield msg
                return  # the server ended the stream: the campaign is final
            except grpc.RpcError as e:
                if e.code() not in RECONNECT_CODES or tries >= reconnects:  # type: ignore[attr-defined]
                    err = from_rpc_error(e)
                    raise err from err.__cause__
                tries += 1
                await asyncio.sleep(min(2.0, 0.1 * 2 ** tries))
            finally:
                call.cancel()

    def list_audit_events(self, *, entity_type: str = "", entity_id: str = "", action: str = "",
                          start: datetime | None = None, end: datetime | None = None, page_size: int = 100,
                          timeout: float | None = None) -> AsyncPager[aud.AuditEvent]:
        """The audit trail, newest first (entity_type: campaign, chip or webhook)."""
        listing = audit_events_listing(entity_type=entity_type, entity_id=entity_id, action=action, start=start,
                                       end=end, page_size=page_size)
        return self._pager(self._audit.ListAuditEvents, listing, timeout)

    # -- chips

    async def register_chip(self, phone: str, waha_base_url: str, waha_session: str, waha_api_key: str, *,
                            display_name: str = "", proxy_label: str = "", pacing: res.Pacing | None = None,
                            request_id: str | None = None, timeout: float | None = None) -> res.Chip:
        """Register a WhatsApp number (a WAHA session). The key is write-only: never returned."""
        req = register_chip_request(phone, waha_base_url, waha_session, waha_api_key, display_name=display_name,
                                    proxy_label=proxy_label, pacing=pacing, request_id_=request_id)
        return await self._call(self._chips.RegisterChip, req, timeout=timeout)

    async def update_chip(self, chip_id: str, *, display_name: str | None = None, proxy_label: str | None = None,
                    pacing: res.Pacing | None = None, warmup: res.WarmupPlan | None = None,
                    waha_api_key: str | None = None, waha_base_url: str | None = None,
                    waha_session: str | None = None, request_id: str | None = None,
                    timeout: float | None = None) -> res.Chip:
        """Change a chip. display_name and proxy_label any time; pacing, warmup and the WAHA
        connection (key, URL, session) only while no RUNNING campaign uses the chip
        (FailedPrecondition CHIP_IN_USE: pause, update, resume). Only the fields given change."""
        req = update_chip_request(chip_id, display_name=display_name, proxy_label=proxy_label, pacing=pacing,
                                  warmup=warmup, waha_api_key=waha_api_key, waha_base_url=waha_base_url,
                                  waha_session=waha_session, request_id_=request_id)
        return await self._call(self._chips.UpdateChip, req, timeout=timeout)

    async def get_chip(self, chip_id: str, *, timeout: float | None = None) -> res.Chip:
        return await self._call(self._chips.GetChip, chs.GetChipRequest(chip_id=chip_id), timeout=timeout)

    def list_chips(self, *, page_size: int = 100, timeout: float | None = None) -> AsyncPager[res.Chip]:
        return self._pager(self._chips.ListChips, chips_listing(page_size), timeout)

    async def delete_chip(self, chip_id: str, *, timeout: float | None = None) -> None:
        """Not retried: DeleteChip has no request_id (a retry could report NOT_FOUND for a delete that worked)."""
        await self._call(self._chips.DeleteChip, chs.DeleteChipRequest(chip_id=chip_id), timeout=timeout)

    # -- credits

    async def get_credit_balance(self, *, timeout: float | None = None) -> crs.CreditBalance:
        """`available` (what a Start can reserve) and `reserved` (held by messages not yet done)."""
        return await self._call(self._credits.GetCreditBalance, crs.GetCreditBalanceRequest(), timeout=timeout)

    def list_credit_transactions(self, *, campaign_id: str = "", kind: CreditKindLike | None = None,
                                 page_size: int = 100,
                                 timeout: float | None = None) -> AsyncPager[crs.CreditTransaction]:
        """The credit ledger, newest first; optionally one campaign's or one kind's entries."""
        return self._pager(self._credits.ListCreditTransactions,
                           credit_transactions_listing(campaign_id, kind, page_size), timeout)


class AsyncWebhooks:
    """`client.webhooks` of AsyncWhagoClient: the methods of `whago_client.webhooks.Webhooks`, awaited."""

    def __init__(self, stub: Any, client: AsyncWhagoClient) -> None:
        self._stub = stub
        self._client = client

    async def create(self, url: str, *, event_types: Sequence[str] = (), description: str = "",
                     enabled: bool = True, request_id: str = "",
                     timeout: float | None = None) -> wh.CreateWebhookEndpointResponse:
        """Registers an endpoint; the answer's `secret` is shown only here (and by rotate_secret)."""
        req = webhook_create_request(url, event_types, description, enabled, request_id)
        return await self._client._call(self._stub.CreateWebhookEndpoint, req, timeout=timeout)  # type: ignore[no-any-return]

    async def get(self, endpoint_id: str, *, timeout: float | None = None) -> wh.WebhookEndpoint:
        return await self._client._call(self._stub.GetWebhookEndpoint,  # type: ignore[no-any-return]
                                        wh.GetWebhookEndpointRequest(endpoint_id=endpoint_id), timeout=timeout)

    def list(self, *, page_size: int = 100, timeout: float | None = None) -> AsyncPager[wh.WebhookEndpoint]:
        return self._client._pager(self._stub.ListWebhookEndpoints, endpoints_listing(page_size), timeout)

    async def update(self, endpoint_id: str, *, url: str | None = None, description: str | None = None,
                     event_types: Sequence[str] | None = None, enabled: bool | None = None,
                     timeout: float | None = None) -> wh.WebhookEndpoint:
        """Changes only the fields given."""
        req = webhook_update_request(endpoint_id, url=url, description=description, event_types=event_types,
                                     enabled=enabled)
        return await self._client._call(self._stub.UpdateWebhookEndpoint, req, timeout=timeout)  # type: ignore[no-any-return]

    async def delete(self, endpoint_id: str, *, timeout: float | None = None) -> None:
        await self._client._call(self._stub.DeleteWebhookEndpoint,
                                 wh.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id), timeout=timeout)

    async def rotate_secret(self, endpoint_id: str, *, grace: timedelta | None = None,
                            timeout: float | None = None) -> wh.RotateWebhookSecretResponse:
        """A new secret; the old one keeps signing for `grace` (server default 24 h)."""
        return await self._client._call(self._stub.RotateWebhookSecret,  # type: ignore[no-any-return]
                                        rotate_secret_request(endpoint_id, grace), timeout=timeout)

    def list_deliveries(self, endpoint_id: str, *, state: int = 0, page_size: int = 100,
                        timeout: float | None = None) -> AsyncPager[wh.WebhookDelivery]:
        return self._client._pager(self._stub.ListWebhookDeliveries,
                                   deliveries_listing(endpoint_id, state, page_size), timeout)

    async def redeliver(self, endpoint_id: str, event_id: int, *,
                        timeout: float | None = None) -> wh.WebhookDelivery:
        return await self._client._call(self._stub.RedeliverEvent,  # type: ignore[no-any-return]
                                        wh.RedeliverEventRequest(endpoint_id=endpoint_id, event_id=event_id),
                                        timeout=timeout)

    async def send_test(self, endpoint_id: str, *, timeout: float | None = None) -> wh.WebhookDelivery:
        return await self._client._call(self._stub.SendTestEvent,  # type: ignore[no-any-return]
                                        wh.SendTestEventRequest(endpoint_id=endpoint_id), timeout=timeout)

