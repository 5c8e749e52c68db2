"""Domain errors and their translation to gRPC statuses with rich details (google.rpc).

Code below the servicers raises these; `interceptors.py` turns them (and database outages)
into statuses, so no RPC ever ends as UNKNOWN or leaks a stack trace."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "whago.campaign.v1"


class ServiceError(Exception):
    """An error with a gRPC status code and google.rpc detail messages."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, details: Iterable[Message] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)

    def to_status(self) -> grpc.Status:
        st = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        for d in self.details:
            packed = any_pb2.Any()
            packed.Pack(d)
            st.details.append(packed)
        return rpc_status.to_status(st)


def error_info(reason: str, metadata: Mapping[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[tuple[str, str]], message: str | None = None) -> None:
        vs = list(violations)
        br = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in vs])
        super().__init__(message or "; ".join(f"{f}: {d}" for f, d in vs), [br])
        self.violations = vs


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource_type: str, name: str) -> None:
        super().__init__(f"{resource_type} {name!r} not found",
                         [error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name)])


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, [error_info(reason, metadata)])
        self.reason = reason


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, [error_info(reason)])


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, [error_info(reason, metadata)])


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, [error_info("UNAUTHENTICATED")])


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str) -> None:
        super().__init__(message, [error_info("PERMISSION_DENIED")])


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class Unavailable(ServiceError):
    """Retry later: RetryInfo for clients that read details, and the same delay as gRPC's retry
    pushback (`grpc-retry-pushback-ms`), which a channel's retry policy honours by itself."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message, [error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=retry_after_seconds))])
        self.retry_after_seconds = retry_after_seconds

    def to_status(self) -> grpc.Status:
        st = super().to_status()
        pushback = ("grpc-retry-pushback-ms", str(self.retry_after_seconds * 1000))
        return _PushbackStatus(st.code, st.details, (*st.trailing_metadata, pushback))


class _PushbackStatus(_Status, grpc.Status):
    """A grpc.Status (as grpc_status builds them) with one more trailer."""


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(ServiceError):
    """The client went away mid-request (e.g. broke a streaming upload); nothing was committed."""

    code = grpc.StatusCode.CANCELLED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL
