"""Typed errors for the WHAGO API: one class per gRPC status code, with the rich
`google.rpc` details (BadRequest, ErrorInfo, ...) already decoded.

Callers catch `NotFound` or `FailedPrecondition` instead of comparing status codes, and read
`field_violations` / `reason` instead of unpacking `Any` messages themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from whago.campaign.v1 import resources_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WaitTimeout",
    "WhagoError",
    "error_class_for",
    "from_rpc_error",
]

_DETAILS_METADATA_KEY = "grpc-status-details-bin"

# Every detail type of google/rpc/error_details.proto, keyed by full name, so `.details`
# holds real messages rather than `Any` wrappers.
_DETAIL_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.BadRequest,
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.RequestInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


class WhagoError(Exception):
    """Base of every error the SDK raises for a failed RPC.

    `code` is the gRPC status code, `message` the server's status message. Rich details:
    `field_violations` from BadRequest as (field, description) pairs; `reason`, `domain`
    and `metadata` from ErrorInfo; `retry_delay` (seconds) from RetryInfo; `details` holds
    every decoded detail message (unknown types stay as `google.protobuf.Any`).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str = "",
        *,
        details: Sequence[Message] = (),
        field_violations: Iterable[tuple[str, str]] = (),
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[Message] = list(details)
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        for field, description in self.field_violations:
            text += f"\n  {field}: {description}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class Cancelled(WhagoError):
    code = grpc.StatusCode.CANCELLED


class Unknown(WhagoError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(WhagoError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(WhagoError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(WhagoError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(WhagoError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(WhagoError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(WhagoError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(WhagoError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(WhagoError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(WhagoError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(WhagoError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(WhagoError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(WhagoError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(WhagoError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(WhagoError):
    code = grpc.StatusCode.UNAUTHENTICATED


class WaitTimeout(DeadlineExceeded):
    """Client-side: `wait_for_state` gave up. `.last` is the campaign as last seen."""

    def __init__(self, message: str, last: resources_pb2.Campaign | None = None) -> None:
        super().__init__(message)
        self.last = last


_BY_CODE: dict[grpc.StatusCode, type[WhagoError]] = {
    cls.code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def error_class_for(code: grpc.StatusCode) -> type[WhagoError]:
    """The exception class for a status code (`Unknown` for anything unmapped)."""
    return _BY_CODE.get(code, Unknown)


def _decode_any(detail: any_pb2.Any) -> Message:
    """Unpack a known google.rpc detail; keep the Any when the type is foreign or corrupt."""
    cls = _DETAIL_TYPES.get(detail.TypeName())
    if cls is None:
        return detail
    msg = cls()
    try:
        if detail.Unpack(msg):
            return msg
    except DecodeError:
        pass
    return detail


def _rich_status(call: Any) -> status_pb2.Status | None:
    """The google.rpc.Status of a failed call, tolerating servers whose status proto and
    call status disagree (grpc_status raises ValueError then; the details are still useful)."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
        return status
    except ValueError:
        pass
    for key, value in call.trailing_metadata() or ():
        if key == _DETAILS_METADATA_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def build_error(
    code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any] = ()
) -> WhagoError:
    """Build the typed error for a status code, message and packed detail messages."""
    decoded = [_decode_any(d) for d in details]
    violations: list[tuple[str, str]] = []
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    for d in decoded:
        if isinstance(d, error_details_pb2.BadRequest):
            violations.extend((v.field, v.description) for v in d.field_violations)
        elif isinstance(d, error_details_pb2.ErrorInfo) and not reason:
            reason, domain, metadata = d.reason, d.domain, dict(d.metadata)
        elif isinstance(d, error_details_pb2.RetryInfo) and d.HasField("retry_delay"):
            retry_delay = d.retry_delay.ToTimedelta().total_seconds()
    return error_class_for(code)(
        message,
        details=decoded,
        field_violations=violations,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_delay=retry_delay,
    )


def from_rpc_error(e: grpc.RpcError) -> WhagoError:
    """Convert a `grpc.RpcError` into the matching `WhagoError` subclass with decoded details.

    The original error is kept as `__cause__` so nothing is lost for debugging.
    """
    code_fn = getattr(e, "code", None)
    details_fn = getattr(e, "details", None)
    if not callable(code_fn):  # not a grpc.Call: nothing but the text to go on
        err: WhagoError = Unknown(str(e))
        err.__cause__ = e
        return err
    code = code_fn() or grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or ""
    status = _rich_status(e) if callable(getattr(e, "trailing_metadata", None)) else None
    err = build_error(code, message, status.details if status is not None else ())
    err.__cause__ = e
    return err
