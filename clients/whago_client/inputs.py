"""Plain Python in, protobuf out: state names, templates, timestamps and contact rows (from any
iterable or a CSV file) as the requests of the WHAGO API want them."""

from __future__ import annotations

import csv
import itertools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import IO, Generic, TypeAlias, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import resources_pb2 as res

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
