"""Synchronous Python client for the WHAGO CampaignService, ChipService, CreditService,
WebhookService and AuditService.

Methods take plain Python arguments and return the protobuf resources (`Campaign`, `Chip`,
...). Every call carries the API key and a deadline, failed calls raise a typed
`WhagoError` subclass, and idempotent calls are retried on UNAVAILABLE.
"""

from __future__ import annotations

import mimetypes
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Self, TypeVar

import grpc
from google.protobuf import field_mask_pb2

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
from whago_client.errors import (
    FailedPrecondition,
    InvalidArgument,
    WaitTimeout,
    from_rpc_error,
)
from whago_client.inputs import (
    FINAL_CAMPAIGN_STATES,
    CampaignStateLike,
    ContactRow,
    CreditKindLike,
    MessageStateLike,
    RequestGuard,
    campaign_state,
    credit_kind,
    import_requests,
    message_state,
    to_template,
    to_timestamp,
)
from whago_client.pager import Pager
from whago_client.retry import RetryPolicy
from whago_client.watch import watch_campaign
from whago_client.webhooks import Webhooks, list_audit_events

__all__ = ["DEFAULT_TARGET", "WhagoClient"]

DEFAULT_TARGET = "127.0.0.1:50051"
USER_AGENT = "whago-client/0.1"
#: The server refuses larger uploads; checking first saves sending megabytes for nothing.
MAX_MEDIA_BYTES = 16 * 1024 * 1024
#: A million-row import legitimately takes minutes; the usual 30 s deadline would cut it.
IMPORT_TIMEOUT = 3600.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


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
        if api_key is None:
            api_key = os.environ.get("WHAGO_API_KEY") or None
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata: tuple[tuple[str, str], ...] = tuple(metadata) + (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._owns_channel = channel is None
        if channel is None:
            options = [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", self.retry.service_config()),
                ("grpc.primary_user_agent", USER_AGENT),
                ("grpc.max_send_message_length", 32 * 1024 * 1024),
                ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ]
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
        self.webhooks = Webhooks(wh_grpc.WebhookServiceStub(channel), self._call)
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

    @staticmethod
    def _request_id(request_id: str | None) -> str:
        """A fresh id per logical call, reused by its retries, makes them idempotent."""
        return request_id if request_id else str(uuid.uuid4())

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
        campaign = res.Campaign(
            name=name,
            description=description,
            templates=[to_template(t) for t in templates],
            chip_ids=list(chip_ids),
        )
        if settings is not None:
            campaign.settings.CopyFrom(settings)
        if schedule_time is not None:
            campaign.schedule_time.CopyFrom(to_timestamp(schedule_time))
        req = cs.CreateCampaignRequest(campaign=campaign, request_id=self._request_id(request_id))
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
        state_value = campaign_state(state) if state is not None else res.CAMPAIGN_STATE_UNSPECIFIED

        def fetch(token: str) -> tuple[Sequence[res.Campaign], str]:
            req = cs.ListCampaignsRequest(page_size=page_size, page_token=token, state=state_value)
            resp = self._call(self._campaigns.ListCampaigns, req, timeout=timeout)
            return resp.campaigns, resp.next_page_token

        return Pager(fetch)

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
        req = cs.UpdateCampaignRequest(
            campaign=campaign,
            update_mask=field_mask_pb2.FieldMask(paths=list(update_mask)),
            request_id=self._request_id(request_id),
        )
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
        guard = RequestGuard(
            import_requests(campaign_id, rows, batch_size=batch_size, default_region=default_region)
        )
        try:
            future = self._campaigns.ImportContacts.future(guard, timeout=timeout, metadata=self._metadata)
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
        def fetch(token: str) -> tuple[Sequence[res.Contact], str]:
            req = cs.ListContactsRequest(campaign_id=campaign_id, page_size=page_size, page_token=token)
            resp = self._call(self._campaigns.ListContacts, req, timeout=timeout)
            return resp.contacts, resp.next_page_token

        return Pager(fetch)

    def list_messages(
        self,
        campaign_id: str,
        state: MessageStateLike | None = None,
        *,
        page_size: int = 1000,
        timeout: float | None = None,
    ) -> Pager[res.CampaignMessage]:
        """The campaign's messages, optionally only those in `state` (e.g. "FAILED")."""
        state_value = message_state(state) if state is not None else res.MESSAGE_STATE_UNSPECIFIED

        def fetch(token: str) -> tuple[Sequence[res.CampaignMessage], str]:
            req = cs.ListCampaignMessagesRequest(
                campaign_id=campaign_id, page_size=page_size, page_token=token, state=state_value
            )
            resp = self._call(
                self._campaigns.ListCampaignMessages, req, timeout=timeout
            )
            return resp.messages, resp.next_page_token

        return Pager(fetch)

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
        """
        if isinstance(source, bytes):
            if not filename:
                raise ValueError("filename is required when uploading bytes")
            content = source
        else:
            with open(source, "rb") as f:
                content = f.read(MAX_MEDIA_BYTES + 1)
            filename = filename or os.path.basename(os.fspath(source))
        if len(content) > MAX_MEDIA_BYTES:
            raise InvalidArgument(
                "media is larger than 16 MiB",
                field_violations=[("content", "at most 16 MiB")],
            )
        mime = mime_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        req = cs.UploadMediaRequest(
            campaign_id=campaign_id,
            filename=filename,
            mime_type=mime,
            content=content,
            request_id=self._request_id(request_id),
        )
        return self._call(self._campaigns.UploadMedia, req, timeout=timeout)

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
        if isinstance(states, (str, int)):
            states = [states]
        wanted = {campaign_state(s) for s in states}
        give_up = None if timeout is None else time.monotonic() + timeout
        last_key: tuple[int, ...] | None = None
        campaign: res.Campaign | None = None
        while True:
            campaign = self.get_campaign(campaign_id)
            key = (
                campaign.state, campaign.total_contacts, campaign.pending_count,
                campaign.sent_count, campaign.delivered_count, campaign.read_count,
                campaign.failed_count, campaign.skipped_count,
            )
            if on_change is not None and key != last_key:
                on_change(campaign)
            last_key = key
            if campaign.state in wanted:
                return campaign
            if campaign.state in FINAL_CAMPAIGN_STATES:
                raise FailedPrecondition(
                    f"campaign {campaign_id} ended {res.CampaignState.Name(campaign.state)}",
                    reason="CAMPAIGN_ENDED",
                )
            if give_up is not None and time.monotonic() + poll > give_up:
                wanted_names = sorted(res.CampaignState.Name(s) for s in wanted)
                raise WaitTimeout(
                    f"campaign {campaign_id} not in {wanted_names} after {timeout:g}s "
                    f"(still {res.CampaignState.Name(campaign.state)})",
                    last=campaign,
                )
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
        return list_audit_events(self._audit, self._call, entity_type=entity_type, entity_id=entity_id,
                                 action=action, start=start, end=end, page_size=page_size, timeout=timeout)

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
        chip = res.Chip(
            phone=phone,
            waha_base_url=waha_base_url,
            waha_session=waha_session,
            waha_api_key=waha_api_key,
            display_name=display_name,
            proxy_label=proxy_label,
        )
        if pacing is not None:
            chip.pacing.CopyFrom(pacing)
        req = chs.RegisterChipRequest(chip=chip, request_id=self._request_id(request_id))
        return self._call(self._chips.RegisterChip, req, timeout=timeout)

    def get_chip(self, chip_id: str, *, timeout: float | None = None) -> res.Chip:
        req = chs.GetChipRequest(chip_id=chip_id)
        return self._call(self._chips.GetChip, req, timeout=timeout)

    def list_chips(self, *, page_size: int = 100, timeout: float | None = None) -> Pager[res.Chip]:
        def fetch(token: str) -> tuple[Sequence[res.Chip], str]:
            req = chs.ListChipsRequest(page_size=page_size, page_token=token)
            resp = self._call(self._chips.ListChips, req, timeout=timeout)
            return resp.chips, resp.next_page_token

        return Pager(fetch)

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
        kind_value = credit_kind(kind) if kind is not None else crs.CREDIT_TRANSACTION_KIND_UNSPECIFIED

        def fetch(token: str) -> tuple[Sequence[crs.CreditTransaction], str]:
            req = crs.ListCreditTransactionsRequest(page_size=page_size, page_token=token,
                                                    campaign_id=campaign_id, kind=kind_value)
            resp = self._call(self._credits.ListCreditTransactions, req, timeout=timeout)
            return resp.transactions, resp.next_page_token

        return Pager(fetch)
