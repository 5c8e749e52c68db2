"""Synchronous Python client for the WHAGO CampaignService, ChipService, CreditService,
WebhookService and AuditService.

Methods take plain Python arguments and return the protobuf resources (`Campaign`, `Chip`,
...). Every call carries the API key and a deadline, failed calls raise a typed
`WhagoError` subclass, and idempotent calls are retried on UNAVAILABLE.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Self, TypeVar

import grpc

from whago.campaign.v1 import (
    audit_service_pb2 as aud,
)
from whago.campaign.v1 import (
    audit_service_pb2_grpc as aud_grpc,
)
from whago.campaign.v1 import (
    campaign_service_pb2 as cs,
)
from whago.campaign.v1 import (
    campaign_service_pb2_grpc as cs_grpc,
)
from whago.campaign.v1 import (
    chip_service_pb2 as chs,
)
from whago.campaign.v1 import (
    chip_service_pb2_grpc as chs_grpc,
)
from whago.campaign.v1 import (
    credit_service_pb2 as crs,
)
from whago.campaign.v1 import (
    credit_service_pb2_grpc as crs_grpc,
)
from whago.campaign.v1 import (
    resources_pb2 as res,
)
from whago.campaign.v1 import (
    webhook_service_pb2_grpc as wh_grpc,
)
from whago_client.errors import from_rpc_error
from whago_client.inputs import (
    FINAL_CAMPAIGN_STATES,
    MAX_MEDIA_BYTES,
    CampaignStateLike,
    ContactRow,
    CreditKindLike,
    Listing,
    MessageStateLike,
    PageResponse,
    RequestGuard,
    audit_events_listing,
    campaigns_listing,
    check_wait,
    chips_listing,
    contacts_listing,
    create_campaign_request,
    credit_transactions_listing,
    import_requests,
    media_upload,
    messages_listing,
    progress_key,
    register_chip_request,
    request_id,
    update_campaign_request,
    update_chip_request,
    wanted_states,
)
from whago_client.pager import Pager
from whago_client.retry import RetryPolicy
from whago_client.watch import watch_campaign
from whago_client.webhooks import Webhooks

__all__ = ["DEFAULT_TARGET", "IMPORT_TIMEOUT", "MAX_MEDIA_BYTES", "WhagoClient", "channel_options"]

DEFAULT_TARGET = "127.0.0.1:50051"
USER_AGENT = "whago-client/0.1"
#: A million-row import legitimately takes minutes; the usual 30 s deadline would cut it.
IMPORT_TIMEOUT = 3600.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")
PageResp = TypeVar("PageResp", bound=PageResponse)
T = TypeVar("T")


def channel_options(retry: RetryPolicy) -> list[tuple[str, object]]:
    """Channel options of both clients: gRPC's own retries per `retry`, the SDK's user agent, 32 MiB messages."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry.service_config()),
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.max_send_message_length", 32 * 1024 * 1024),
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ]


def auth_metadata(api_key: str | None, metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """`api_key` defaults to $WHAGO_API_KEY; sent as a bearer token on every call."""
    if api_key is None:
        api_key = os.environ.get("WHAGO_API_KEY") or None
    return tuple(metadata) + ((("authorization", f"Bearer {api_key}"),) if api_key else ())


# --------------------------------------------------------------------------- the client


class WhagoClient:
    """Client for CampaignService, ChipService and CreditService.

    >>> with WhagoClient("127.0.0.1:50051", api_key="...") as client:
    ...     c = client.create_campaign("Promo", templates=["Hi {{name}}!"])
    ...     client.import_contacts(c.id, ["+55 11 99999-9999"])
    ...     client.start_campaign(c.id)

    `api_key` defaults to $WHAGO_API_KEY. `timeout` is the default deadline of each call in
    seconds (retries included). Pass `channel` to share one; the client then leaves it open
    on close(), since its owner may still use it (and its own service config decides retries).
    `credentials` makes a TLS channel.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        channel: grpc.Channel | None = None,
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
            channel = (
                grpc.secure_channel(target, credentials, options=options)
                if credentials is not None
                else grpc.insecure_channel(target, options=options)
            )
        self.channel: grpc.Channel = channel
        self._campaigns = cs_grpc.CampaignServiceStub(channel)
        self._chips = chs_grpc.ChipServiceStub(channel)
        self._credits = crs_grpc.CreditServiceStub(channel)
        self._audit = aud_grpc.AuditServiceStub(channel)
        #: WebhookService: endpoints, secrets, deliveries (see whago_client.webhooks.Webhooks).
        self.webhooks = Webhooks(wh_grpc.WebhookServiceStub(channel), self)
        self._sleep: Callable[[float], None] = time.sleep  # wait_for_state's polls

    # -- lifecycle of the client

    def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WhagoClient({self.target!r})"

    # -- plumbing

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        timeout: float | None,
    ) -> Resp:
        """One unary RPC with auth and an overall deadline (gRPC's retries included); typed errors."""
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            raise err from err.__cause__

    def _pager(self, method: grpc.UnaryUnaryMultiCallable[Req, PageResp], listing: Listing[Req, PageResp, T],
               timeout: float | None) -> Pager[T]:
        """A Pager whose pages are `listing`'s requests sent through `_call`."""
        def fetch(token: str) -> tuple[Sequence[T], str]:
            resp = self._call(method, listing.request(token), timeout=timeout)
            return listing.items(resp), resp.next_page_token
        return Pager(fetch)

    @staticmethod
    def _request_id(value: str | None) -> str:
        return request_id(value)

    # -- campaigns

    def create_campaign(
        self,
        name: str,
        *,
        description: str = "",
        templates: Sequence[str | res.MessageTemplate] = (),
        chip_ids: Sequence[str] = (),
        settings: res.CampaignSettings | None = None,
        schedule_time: datetime | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> res.Campaign:
        """Create a campaign: DRAFT, or SCHEDULED when `schedule_time` (timezone-aware) is set."""
        req = create_campaign_request(name, description=description, templates=templates, chip_ids=chip_ids,
                                      settings=settings, schedule_time=schedule_time, request_id_=request_id)
        return self._call(self._campaigns.CreateCampaign, req, timeout=timeout)

    def get_campaign(self, campaign_id: str, *, timeout: float | None = None) -> res.Campaign:
        req = cs.GetCampaignRequest(campaign_id=campaign_id)
        return self._call(self._campaigns.GetCampaign, req, timeout=timeout)

    def list_campaigns(
        self,
        state: CampaignStateLike | None = None,
        *,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Pager[res.Campaign]:
        """All the caller's campaigns (newest first), optionally only those in `state`."""
        return self._pager(self._campaigns.ListCampaigns, campaigns_listing(state, page_size), timeout)

    def update_campaign(
        self,
        campaign: res.Campaign,
        update_mask: Sequence[str],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> res.Campaign:
        """Update the fields named in `update_mask`. Set `campaign.etag` to fail (Aborted)
        instead of overwriting someone else's concurrent change."""
        req = update_campaign_request(campaign, update_mask, request_id)
        return self._call(self._campaigns.UpdateCampaign, req, timeout=timeout)

    def delete_campaign(
        self,
        campaign_id: str,
        etag: str = "",
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cs.DeleteCampaignResponse:
        """Delete a DRAFT, CANCELLED or COMPLETED campaign; returns what was removed."""
        req = cs.DeleteCampaignRequest(
            campaign_id=campaign_id, etag=etag, request_id=self._request_id(request_id)
        )
        return self._call(self._campaigns.DeleteCampaign, req, timeout=timeout)

    def start_campaign(
        self, campaign_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> res.Campaign:
        req = cs.StartCampaignRequest(campaign_id=campaign_id, request_id=self._request_id(request_id))
        return self._call(self._campaigns.StartCampaign, req, timeout=timeout)

    def pause_campaign(
        self, campaign_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> res.Campaign:
        """Returns once no further message of the campaign will reach WAHA."""
        req = cs.PauseCampaignRequest(campaign_id=campaign_id, request_id=self._request_id(request_id))
        return self._call(self._campaigns.PauseCampaign, req, timeout=timeout)

    def resume_campaign(
        self, campaign_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> res.Campaign:
        req = cs.ResumeCampaignRequest(campaign_id=campaign_id, request_id=self._request_id(request_id))
        return self._call(self._campaigns.ResumeCampaign, req, timeout=timeout)

    def cancel_campaign(
        self, campaign_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> res.Campaign:
        """Returns once no further message of the campaign will reach WAHA."""
        req = cs.CancelCampaignRequest(campaign_id=campaign_id, request_id=self._request_id(request_id))
        return self._call(self._campaigns.CancelCampaign, req, timeout=timeout)

    def import_contacts(
        self,
        campaign_id: str,
        rows: Iterable[ContactRow],
        *,
        batch_size: int = 1000,
        default_region: str = "",
        timeout: float | None = IMPORT_TIMEOUT,
    ) -> cs.ImportContactsResponse:
        """Stream contacts into a DRAFT/SCHEDULED campaign, `batch_size` per message.

        `rows` is consumed lazily (see `import_requests`), e.g. `read_contacts_csv(path)`.
        `timeout` bounds the whole upload (default one hour; None for no deadline).
        Not retried: the stream cannot be replayed. An exception raised by `rows` cancels the
        call and is re-raised here as is.
        """
        return self._stream_call(
            self._campaigns.ImportContacts,
            import_requests(campaign_id, rows, batch_size=batch_size, default_region=default_region),
            timeout=timeout,
        )

    def _stream_call(self, method: grpc.StreamUnaryMultiCallable[Req, Resp], requests: Iterator[Req], *,
                     timeout: float | None) -> Resp:
        """One client-streaming RPC fed lazily from `requests`: an exception raised by them
        cancels the call (the server never commits a broken stream) and is re-raised as is."""
        guard = RequestGuard(requests)
        try:
            future = method.future(guard, timeout=timeout, metadata=self._metadata)
        except BaseException:
            guard.abandon()  # release gRPC's request thread, which waits for attach()
            raise
        guard.attach(future)
        try:
            return future.result()
        except grpc.RpcError as e:
            if guard.error is not None:
                raise guard.error from None
            raise from_rpc_error(e) from e
        except grpc.FutureCancelledError:
            if guard.error is not None:
                raise guard.error from None
            raise
        except BaseException:  # e.g. KeyboardInterrupt: do not leave the upload running
            future.cancel()
            raise

    def list_contacts(
        self, campaign_id: str, *, page_size: int = 1000, timeout: float | None = None
    ) -> Pager[res.Contact]:
        return self._pager(self._campaigns.ListContacts, contacts_listing(campaign_id, page_size), timeout)

    def list_messages(
        self,
        campaign_id: str,
        state: MessageStateLike | None = None,
        *,
        page_size: int = 1000,
        timeout: float | None = None,
    ) -> Pager[res.CampaignMessage]:
        """The campaign's messages, optionally only those in `state` (e.g. "FAILED")."""
        return self._pager(self._campaigns.ListCampaignMessages, messages_listing(campaign_id, state, page_size),
                           timeout)

    def upload_media(
        self,
        campaign_id: str,
        source: bytes | str | os.PathLike[str],
        filename: str | None = None,
        mime_type: str | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> res.Media:
        """Upload a file (path) or raw bytes; the returned `Media.id` goes in a template.

        For a path, `filename` defaults to its base name and `mime_type` is guessed from it.
        Small content goes in one UploadMedia; a path larger than one chunk (4 MiB) streams
        through UploadMediaChunks, read as it goes (documents up to 100 MB). `timeout` bounds
        the whole upload (default: the client's, or IMPORT_TIMEOUT for a stream).
        """
        upload = media_upload(campaign_id, source, filename, mime_type, request_id)
        if isinstance(upload, cs.UploadMediaRequest):
            return self._call(self._campaigns.UploadMedia, upload, timeout=timeout)
        return self._stream_call(self._campaigns.UploadMediaChunks, upload,
                                 timeout=IMPORT_TIMEOUT if timeout is None else timeout)

    def delete_media(self, campaign_id: str, media_id: str, *, request_id: str | None = None,
                     timeout: float | None = None) -> cs.DeleteMediaResponse:
        """Delete a media file of a DRAFT/SCHEDULED campaign no template uses (FAILED_PRECONDITION
        otherwise); `file_deleted` says whether the stored content went too (no other campaign of
        yours uses it)."""
        req = cs.DeleteMediaRequest(campaign_id=campaign_id, media_id=media_id, request_id=self._request_id(request_id))
        return self._call(self._campaigns.DeleteMedia, req, timeout=timeout)

    def list_media(self, campaign_id: str, *, timeout: float | None = None) -> list[res.Media]:
        req = cs.ListCampaignMediaRequest(campaign_id=campaign_id)
        resp = self._call(self._campaigns.ListCampaignMedia, req, timeout=timeout)
        return list(resp.media)

    def wait_for_state(
        self,
        campaign_id: str,
        states: CampaignStateLike | Collection[CampaignStateLike] = tuple(FINAL_CAMPAIGN_STATES),
        timeout: float | None = 60.0,
        poll: float = 0.5,
        *,
        on_change: Callable[[res.Campaign], None] | None = None,
    ) -> res.Campaign:
        """Poll until the campaign is in one of `states`; returns it.

        `timeout=None` waits forever. `on_change` sees every snapshot whose state or counters
        differ from the previous one (progress reporting). Raises `WaitTimeout` (a
        `DeadlineExceeded`) carrying the last snapshot, and stops early with
        `FailedPrecondition` if the campaign reaches a final state not among `states`.
        """
        wanted = wanted_states(states)
        give_up = None if timeout is None else time.monotonic() + timeout
        last_key: tuple[int, ...] | None = None
        while True:
            campaign = self.get_campaign(campaign_id)
            key = progress_key(campaign)
            if on_change is not None and key != last_key:
                on_change(campaign)
            last_key = key
            if check_wait(campaign, wanted, campaign_id, give_up, poll, timeout):
                return campaign
            self._sleep(poll)

    def watch(self, campaign_id: str, *, after_seq: int = 0, timeout: float | None = None
              ) -> Iterator[cs.WatchCampaignResponse]:
        """WatchCampaign as an iterator: a snapshot, then every event of the campaign until it is
        final. Reconnects on UNAVAILABLE from the last event seen (a new snapshot comes first);
        `timeout=None` watches as long as the campaign runs."""
        return watch_campaign(self._campaigns, self._metadata, campaign_id, after_seq=after_seq, timeout=timeout)

    def list_audit_events(self, *, entity_type: str = "", entity_id: str = "", action: str = "",
                          start: datetime | None = None, end: datetime | None = None, page_size: int = 100,
                          timeout: float | None = None) -> Pager[aud.AuditEvent]:
        """The audit trail, newest first (entity_type: campaign, chip or webhook)."""
        listing = audit_events_listing(entity_type=entity_type, entity_id=entity_id, action=action, start=start,
                                       end=end, page_size=page_size)
        return self._pager(self._audit.ListAuditEvents, listing, timeout)

    # -- chips

    def register_chip(
        self,
        phone: str,
        waha_base_url: str,
        waha_session: str,
        waha_api_key: str,
        *,
        display_name: str = "",
        proxy_label: str = "",
        pacing: res.Pacing | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> res.Chip:
        """Register a WhatsApp number (a WAHA session). The key is write-only: never returned."""
        req = register_chip_request(phone, waha_base_url, waha_session, waha_api_key, display_name=display_name,
                                    proxy_label=proxy_label, pacing=pacing, request_id_=request_id)
        return self._call(self._chips.RegisterChip, req, timeout=timeout)

    def update_chip(self, chip_id: str, *, display_name: str | None = None, proxy_label: str | None = None,
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
        return self._call(self._chips.UpdateChip, req, timeout=timeout)

    def get_chip(self, chip_id: str, *, timeout: float | None = None) -> res.Chip:
        req = chs.GetChipRequest(chip_id=chip_id)
        return self._call(self._chips.GetChip, req, timeout=timeout)

    def list_chips(self, *, page_size: int = 100, timeout: float | None = None) -> Pager[res.Chip]:
        return self._pager(self._chips.ListChips, chips_listing(page_size), timeout)

    def delete_chip(self, chip_id: str, *, timeout: float | None = None) -> None:
        """Not retried: DeleteChip has no request_id, so a retry could report NOT_FOUND for a
        delete that succeeded."""
        req = chs.DeleteChipRequest(chip_id=chip_id)
        self._call(self._chips.DeleteChip, req, timeout=timeout)

    # -- credits

    def get_credit_balance(self, *, timeout: float | None = None) -> crs.CreditBalance:
        """The caller's credits: `available` (what a Start can reserve) and `reserved` (held by
        messages not yet sent, failed or skipped)."""
        return self._call(self._credits.GetCreditBalance, crs.GetCreditBalanceRequest(), timeout=timeout)

    def list_credit_transactions(
        self,
        *,
        campaign_id: str = "",
        kind: CreditKindLike | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Pager[crs.CreditTransaction]:
        """The caller's credit ledger, newest first; optionally one campaign's entries, or one
        kind's ("GRANT", "RESERVE", "CONSUME", "RELEASE")."""
        return self._pager(self._credits.ListCreditTransactions,
                           credit_transactions_listing(campaign_id, kind, page_size), timeout)
