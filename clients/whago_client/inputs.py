"""Plain Python in, protobuf out: state names, templates, timestamps and contact rows (from any
iterable or a CSV file) as the requests of the WHAGO API want them, and the requests themselves,
built once for both WhagoClient and AsyncWhagoClient."""

from __future__ import annotations

import csv
import itertools
import mimetypes
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, Generic, Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from whago.campaign.v1 import audit_service_pb2 as aud
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wh
from whago_client.errors import FailedPrecondition, InvalidArgument, WaitTimeout

T = TypeVar("T")

#: States a campaign never leaves on its own.
FINAL_CAMPAIGN_STATES: frozenset[res.CampaignState.ValueType] = frozenset(
    {res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED}
)

#: What `import_contacts` accepts per row: a ContactInput, a mapping with "phone", optional
#: "name" and the rest as template variables (like a csv.DictReader row), or a bare phone.
ContactRow: TypeAlias = cs.ContactInput | Mapping[str, object] | str
CampaignStateLike: TypeAlias = int | str
MessageStateLike: TypeAlias = int | str
CreditKindLike: TypeAlias = int | str
#: The server refuses larger uploads; checking first saves sending megabytes for nothing.
MAX_MEDIA_BYTES = 16 * 1024 * 1024
#: Bytes per UploadMediaChunks message (the server reads up to 4 MiB a chunk).
MEDIA_CHUNK_BYTES = 4 * 1024 * 1024




def _enum_value(
    enum: object, prefix: str, value: int | str, what: str
) -> int:
    """Resolve an enum given as value, full name or short name ("RUNNING")."""
    wrapper = enum  # an EnumTypeWrapper; typed loosely to share the code for both enums
    names: list[str] = list(wrapper.keys())  # type: ignore[attr-defined]
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith(prefix):
            name = prefix + name
        if name in names and not name.endswith("_UNSPECIFIED"):
            return int(wrapper.Value(name))  # type: ignore[attr-defined]
    elif value in wrapper.values():  # type: ignore[attr-defined]
        return int(value)
    valid = ", ".join(n.removeprefix(prefix) for n in names if not n.endswith("_UNSPECIFIED"))
    raise ValueError(f"unknown {what} {value!r}; expected one of {valid}")


def campaign_state(value: CampaignStateLike) -> res.CampaignState.ValueType:
    """`CampaignState` from a value or a name such as "RUNNING" or "CAMPAIGN_STATE_RUNNING"."""
    return res.CampaignState.ValueType(
        _enum_value(res.CampaignState, "CAMPAIGN_STATE_", value, "campaign state")
    )


def message_state(value: MessageStateLike) -> res.MessageState.ValueType:
    """`MessageState` from a value or a name such as "FAILED" or "MESSAGE_STATE_FAILED"."""
    return res.MessageState.ValueType(
        _enum_value(res.MessageState, "MESSAGE_STATE_", value, "message state")
    )


def credit_kind(value: CreditKindLike) -> crs.CreditTransactionKind.ValueType:
    """`CreditTransactionKind` from a value or a name such as "RELEASE" or "CREDIT_TRANSACTION_KIND_RELEASE"."""
    return crs.CreditTransactionKind.ValueType(
        _enum_value(crs.CreditTransactionKind, "CREDIT_TRANSACTION_KIND_", value, "credit transaction kind")
    )


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A naive datetime is refused: guessing UTC or local time would schedule at the wrong hour."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("schedule_time must be timezone-aware (e.g. datetime.now(timezone.utc))")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_template(t: str | res.MessageTemplate) -> res.MessageTemplate:
    return res.MessageTemplate(text=t) if isinstance(t, str) else t


def to_contact_input(row: ContactRow) -> cs.ContactInput:
    """Normalize one import row into a `ContactInput` (see `ContactRow`)."""
    if isinstance(row, cs.ContactInput):
        return row
    if isinstance(row, str):
        return cs.ContactInput(phone=row.strip())
    if isinstance(row, Mapping):
        contact = cs.ContactInput()
        for key, value in row.items():
            if value is None:
                continue
            k = str(key).strip()
            if k.lower() == "phone":
                contact.phone = str(value).strip()
            elif k.lower() == "name":
                contact.name = str(value).strip()
            elif k == "variables" and isinstance(value, Mapping):
                contact.variables.update({str(a): str(b) for a, b in value.items()})
            elif k:
                contact.variables[k] = str(value)
        return contact
    raise TypeError(f"cannot import a contact from {type(row).__name__}")


def import_requests(
    campaign_id: str,
    rows: Iterable[ContactRow],
    *,
    batch_size: int = 1000,
    default_region: str = "",
) -> Iterator[cs.ImportContactsRequest]:
    """The ImportContacts request stream: rows chunked lazily into `batch_size` contacts.

    Only one chunk is in memory at a time, so an iterator over a million-line file streams
    without being materialized. An empty input still yields one request, so the server learns
    the campaign id and answers with the campaign's totals.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    it = iter(rows)
    first = True
    while True:
        chunk = [to_contact_input(r) for r in itertools.islice(it, batch_size)]
        if not chunk and not first:
            return
        # campaign_id on every message is allowed ("must match") and keeps each self-describing.
        yield cs.ImportContactsRequest(
            campaign_id=campaign_id, contacts=chunk, default_region=default_region
        )
        first = False
        if len(chunk) < batch_size:
            return


def read_contacts_csv(
    source: str | os.PathLike[str] | IO[str],
) -> Iterator[cs.ContactInput]:
    """Stream contacts from a CSV with a header: `phone` (required), `name`, and any other
    columns as template variables. Comma, semicolon (Excel in pt-BR) or tab separated.

    The header is read and checked now, so a wrong file fails before any RPC; rows are read
    lazily. Blank lines are skipped; the server numbers the remaining data rows from 1.
    """
    close = isinstance(source, (str, os.PathLike))
    # Opened here, closed by _rows (or below if the header is bad).
    f: IO[str] = open(source, newline="", encoding="utf-8-sig") if isinstance(source, (str, os.PathLike)) else source
    try:
        header_line = f.readline()
        delimiter = max((",", ";", "\t"), key=header_line.count)
        header = [h.strip() for h in next(csv.reader([header_line], delimiter=delimiter), [])]
        lowered = [h.lower() for h in header]
        if "phone" not in lowered:
            raise ValueError(f"CSV header has no 'phone' column (got {header!r})")
    except BaseException:
        if close:
            f.close()
        raise
    phone_at = lowered.index("phone")
    name_at = lowered.index("name") if "name" in lowered else -1

    def _rows() -> Iterator[cs.ContactInput]:
        try:
            for values in csv.reader(f, delimiter=delimiter):
                if not values or not any(v.strip() for v in values):
                    continue
                contact = cs.ContactInput()
                for i, value in enumerate(values[: len(header)]):
                    if i == phone_at:
                        contact.phone = value.strip()
                    elif i == name_at:
                        contact.name = value.strip()
                    elif header[i]:
                        contact.variables[header[i]] = value
                yield contact
        finally:
            if close:
                f.close()

    return _rows()


class RequestGuard(Generic[T]):
    """Wraps a client-stream request iterator that gRPC consumes on its own thread.

    If the iterator raises (bad CSV row, I/O error), gRPC would log a traceback and report a
    bare CANCELLED. Instead the error is kept, the call is cancelled before the stream is
    half-closed (so the server never mistakes a broken upload for a complete one), and the
    caller re-raises the original exception.
    """

    def __init__(self, source: Iterator[T]) -> None:
        self._source = source
        self._ready = threading.Event()
        self._call: grpc.Future | None = None
        self.error: Exception | None = None

    def attach(self, call: grpc.Future) -> None:
        self._call = call
        self._ready.set()

    def abandon(self) -> None:
        """The call could not be made: end the stream without reading the source."""
        self._source = iter(())
        self._ready.set()

    def __iter__(self) -> RequestGuard[T]:
        return self

    def __next__(self) -> T:
        self._ready.wait()
        try:
            return next(self._source)
        except StopIteration:
            raise
        except Exception as e:  # any failure of the source must stop the upload
            self.error = e
            if self._call is not None:
                self._call.cancel()
            raise StopIteration from None


# --------------------------------------------------------------------------- requests of both clients
# WhagoClient and AsyncWhagoClient differ only in how they send; what they send is built here once.


def request_id(value: str | None) -> str:
    """A fresh id per logical call, reused by gRPC's retries of it, makes a mutation idempotent."""
    return value if value else str(uuid.uuid4())


class PageResponse(Protocol):
    @property
    def next_page_token(self) -> str: ...


Req = TypeVar("Req")
Resp = TypeVar("Resp", bound=PageResponse)


@dataclass(frozen=True)
class Listing(Generic[Req, Resp, T]):
    """One paged List call (AIP-158): the request for a page token, and the items of an answer."""

    request: Callable[[str], Req]
    items: Callable[[Resp], Sequence[T]]


def create_campaign_request(
    name: str, *, description: str, templates: Sequence[str | res.MessageTemplate], chip_ids: Sequence[str],
    settings: res.CampaignSettings | None, schedule_time: datetime | None, request_id_: str | None,
) -> cs.CreateCampaignRequest:
    campaign = res.Campaign(name=name, description=description, templates=[to_template(t) for t in templates],
                            chip_ids=list(chip_ids))
    if settings is not None:
        campaign.settings.CopyFrom(settings)
    if schedule_time is not None:
        campaign.schedule_time.CopyFrom(to_timestamp(schedule_time))
    return cs.CreateCampaignRequest(campaign=campaign, request_id=request_id(request_id_))


def update_campaign_request(campaign: res.Campaign, update_mask: Sequence[str],
                            request_id_: str | None) -> cs.UpdateCampaignRequest:
    return cs.UpdateCampaignRequest(campaign=campaign, update_mask=field_mask_pb2.FieldMask(paths=list(update_mask)),
                                    request_id=request_id(request_id_))


def campaigns_listing(state: CampaignStateLike | None, page_size: int
                      ) -> Listing[cs.ListCampaignsRequest, cs.ListCampaignsResponse, res.Campaign]:
    value = campaign_state(state) if state is not None else res.CAMPAIGN_STATE_UNSPECIFIED
    return Listing(lambda token: cs.ListCampaignsRequest(page_size=page_size, page_token=token, state=value),
                   lambda r: r.campaigns)


def contacts_listing(campaign_id: str, page_size: int
                     ) -> Listing[cs.ListContactsRequest, cs.ListContactsResponse, res.Contact]:
    return Listing(lambda token: cs.ListContactsRequest(campaign_id=campaign_id, page_size=page_size,
                                                        page_token=token),
                   lambda r: r.contacts)


def messages_listing(campaign_id: str, state: MessageStateLike | None, page_size: int
                     ) -> Listing[cs.ListCampaignMessagesRequest, cs.ListCampaignMessagesResponse,
                                  res.CampaignMessage]:
    value = message_state(state) if state is not None else res.MESSAGE_STATE_UNSPECIFIED
    return Listing(lambda token: cs.ListCampaignMessagesRequest(campaign_id=campaign_id, page_size=page_size,
                                                                page_token=token, state=value),
                   lambda r: r.messages)


def chips_listing(page_size: int) -> Listing[chs.ListChipsRequest, chs.ListChipsResponse, res.Chip]:
    return Listing(lambda token: chs.ListChipsRequest(page_size=page_size, page_token=token), lambda r: r.chips)


def credit_transactions_listing(campaign_id: str, kind: CreditKindLike | None, page_size: int
                                ) -> Listing[crs.ListCreditTransactionsRequest, crs.ListCreditTransactionsResponse,
                                             crs.CreditTransaction]:
    value = credit_kind(kind) if kind is not None else crs.CREDIT_TRANSACTION_KIND_UNSPECIFIED
    return Listing(lambda token: crs.ListCreditTransactionsRequest(page_size=page_size, page_token=token,
                                                                   campaign_id=campaign_id, kind=value),
                   lambda r: r.transactions)


def audit_events_listing(*, entity_type: str, entity_id: str, action: str, start: datetime | None,
                         end: datetime | None, page_size: int
                         ) -> Listing[aud.ListAuditEventsRequest, aud.ListAuditEventsResponse, aud.AuditEvent]:
    def request(token: str) -> aud.ListAuditEventsRequest:
        req = aud.ListAuditEventsRequest(entity_type=entity_type, entity_id=entity_id, action=action,
                                         page_size=page_size, page_token=token)
        if start is not None:
            req.start_time.CopyFrom(to_timestamp(start))
        if end is not None:
            req.end_time.CopyFrom(to_timestamp(end))
        return req
    return Listing(request, lambda r: r.audit_events)


def register_chip_request(phone: str, waha_base_url: str, waha_session: str, waha_api_key: str, *,
                          display_name: str, proxy_label: str, pacing: res.Pacing | None,
                          request_id_: str | None) -> chs.RegisterChipRequest:
    chip = res.Chip(phone=phone, waha_base_url=waha_base_url, waha_session=waha_session,
                    waha_api_key=waha_api_key, display_name=display_name, proxy_label=proxy_label)
    if pacing is not None:
        chip.pacing.CopyFrom(pacing)
    return chs.RegisterChipRequest(chip=chip, request_id=request_id(request_id_))


def update_chip_request(chip_id: str, *, display_name: str | None, proxy_label: str | None,
                        pacing: res.Pacing | None, warmup: res.WarmupPlan | None, waha_api_key: str | None,
                        waha_base_url: str | None, waha_session: str | None,
                        request_id_: str | None) -> chs.UpdateChipRequest:
    """UpdateChip naming exactly the fields given (not None) in its update_mask."""
    chip = res.Chip(id=chip_id)
    paths: list[str] = []
    for name, value in (("display_name", display_name), ("proxy_label", proxy_label), ("waha_api_key", waha_api_key),
                        ("waha_base_url", waha_base_url), ("waha_session", waha_session)):
        if value is not None:
            setattr(chip, name, value)
            paths.append(name)
    if pacing is not None:
        chip.pacing.CopyFrom(pacing)
        paths.append("pacing")
    if warmup is not None:
        chip.warmup.CopyFrom(warmup)
        paths.append("warmup")
    if not paths:
        raise ValueError("nothing to update: pass at least one field")
    return chs.UpdateChipRequest(chip=chip, update_mask=field_mask_pb2.FieldMask(paths=paths),
                                 request_id=request_id(request_id_))


def media_upload(campaign_id: str, source: bytes | str | os.PathLike[str], filename: str | None,
                 mime_type: str | None, request_id_: str | None
                 ) -> cs.UploadMediaRequest | Iterator[cs.UploadMediaChunksRequest]:
    """One UploadMediaRequest for bytes or a small file; for a file larger than one chunk, the
    UploadMediaChunks stream reading it chunk by chunk (never whole in memory). The server
    enforces each kind's limit as bytes arrive; bytes over MAX_MEDIA_BYTES are refused here
    before sending megabytes."""
    rid = request_id(request_id_)
    if isinstance(source, bytes):
        if not filename:
            raise ValueError("filename is required when uploading bytes")
        if len(source) > MAX_MEDIA_BYTES:
            raise InvalidArgument("media is larger than 16 MiB",
                                  field_violations=[("content", "at most 16 MiB; upload larger files from a path")])
        content = source
    else:
        filename = filename or os.path.basename(os.fspath(source))
        if os.path.getsize(source) > MEDIA_CHUNK_BYTES:
            mime = mime_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
            return _media_chunks(campaign_id, source, filename, mime, rid)
        with open(source, "rb") as f:
            content = f.read()
    mime = mime_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return cs.UploadMediaRequest(campaign_id=campaign_id, filename=filename, mime_type=mime, content=content,
                                 request_id=rid)


def _media_chunks(campaign_id: str, path: str | os.PathLike[str], filename: str, mime: str, rid: str
                  ) -> Iterator[cs.UploadMediaChunksRequest]:
    """The file in MEDIA_CHUNK_BYTES pieces; the first carries what the upload is."""
    with open(path, "rb") as f:
        first = True
        for piece in iter(lambda: f.read(MEDIA_CHUNK_BYTES), b""):
            if first:
                yield cs.UploadMediaChunksRequest(campaign_id=campaign_id, filename=filename, mime_type=mime,
                                                  request_id=rid, content=piece)
                first = False
            else:
                yield cs.UploadMediaChunksRequest(content=piece)
        if first:  # an empty file: one chunk naming it (the server refuses it with the reason)
            yield cs.UploadMediaChunksRequest(campaign_id=campaign_id, filename=filename, mime_type=mime,
                                              request_id=rid)


def progress_key(c: res.Campaign) -> tuple[int, ...]:
    """What `wait_for_state` compares to report only changes."""
    return (c.state, c.total_contacts, c.pending_count, c.sent_count, c.delivered_count, c.read_count,
            c.failed_count, c.skipped_count)


def wanted_states(states: CampaignStateLike | Collection[CampaignStateLike]) -> set[res.CampaignState.ValueType]:
    if isinstance(states, (str, int)):
        states = [states]
    return {campaign_state(s) for s in states}


def check_wait(campaign: res.Campaign, wanted: set[res.CampaignState.ValueType], campaign_id: str,
               give_up: float | None, poll: float, timeout: float | None) -> bool:
    """True once `campaign` is in a wanted state; raises when waiting longer is pointless."""
    if campaign.state in wanted:
        return True
    if campaign.state in FINAL_CAMPAIGN_STATES:
        raise FailedPrecondition(f"campaign {campaign_id} ended {res.CampaignState.Name(campaign.state)}",
                                 reason="CAMPAIGN_ENDED")
    if give_up is not None and time.monotonic() + poll > give_up:
        names = sorted(res.CampaignState.Name(s) for s in wanted)
        raise WaitTimeout(f"campaign {campaign_id} not in {names} after {timeout:g}s "
                          f"(still {res.CampaignState.Name(campaign.state)})", last=campaign)
    return False


def webhook_create_request(url: str, event_types: Sequence[str], description: str, enabled: bool,
                           request_id_: str) -> wh.CreateWebhookEndpointRequest:
    ep = wh.WebhookEndpoint(url=url, event_types=list(event_types), description=description, enabled=enabled)
    return wh.CreateWebhookEndpointRequest(endpoint=ep, request_id=request_id_)


def webhook_update_request(endpoint_id: str, *, url: str | None, description: str | None,
                           event_types: Sequence[str] | None, enabled: bool | None
                           ) -> wh.UpdateWebhookEndpointRequest:
    """Only the fields given go in the update mask."""
    ep = wh.WebhookEndpoint(endpoint_id=endpoint_id, url=url or "", description=description or "",
                            event_types=list(event_types or ()), enabled=bool(enabled))
    paths = [p for p, v in (("url", url), ("description", description), ("event_types", event_types),
                            ("enabled", enabled)) if v is not None]
    return wh.UpdateWebhookEndpointRequest(endpoint=ep, update_mask=field_mask_pb2.FieldMask(paths=paths))


def rotate_secret_request(endpoint_id: str, grace: timedelta | None) -> wh.RotateWebhookSecretRequest:
    req = wh.RotateWebhookSecretRequest(endpoint_id=endpoint_id)
    if grace is not None:
        req.grace_period.CopyFrom(duration_pb2.Duration(seconds=int(grace.total_seconds())))
    return req


def endpoints_listing(page_size: int
                      ) -> Listing[wh.ListWebhookEndpointsRequest, wh.ListWebhookEndpointsResponse,
                                   wh.WebhookEndpoint]:
    return Listing(lambda token: wh.ListWebhookEndpointsRequest(page_size=page_size, page_token=token),
                   lambda r: r.endpoints)


def deliveries_listing(endpoint_id: str, state: int, page_size: int
                       ) -> Listing[wh.ListWebhookDeliveriesRequest, wh.ListWebhookDeliveriesResponse,
                                    wh.WebhookDelivery]:
    return Listing(lambda token: wh.ListWebhookDeliveriesRequest(
        endpoint_id=endpoint_id, state=state, page_size=page_size, page_token=token),  # type: ignore[arg-type]
        lambda r: r.deliveries)
