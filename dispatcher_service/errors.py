"""Domain errors of DispatcherService and their translation to gRPC statuses with rich details
(google.rpc), shaped like campaign_service/errors.py.

Handlers raise these (or let fences.StaleEpoch and Redis errors escape); `to_service_error` is the
one place that maps any exception to a status, so no RPC ends as UNKNOWN or leaks a trace."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import RedisError

from dispatcher_service.fences import StaleEpoch

DOMAIN = "dispatcher.whago"


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

    def __init__(self, violations: Iterable[tuple[str, str]]) -> None:
        vs = list(violations)
        br = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in vs])
        super().__init__("; ".join(f"{f}: {d}" for f, d in vs), [br])
        self.violations = vs


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, [error_info(reason, metadata)])


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, [error_info(reason, metadata)])
        self.reason = reason


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


def stale_epoch(exc: StaleEpoch) -> FailedPrecondition:
    return FailedPrecondition(
        "STALE_EPOCH", f"epoch {exc.epoch} is older than the campaign's current dispatch ({exc.current})",
        {"campaign_id": exc.campaign_id, "current": exc.current, "epoch": str(exc.epoch)})


def to_service_error(exc: BaseException) -> ServiceError:
    """Every exception a handler lets out, as the status the caller gets."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, StaleEpoch):
        return stale_epoch(exc)
    if isinstance(exc, RedisError | OSError):
        return Unavailable(f"redis unavailable: {type(exc).__name__}")
    return Internal(f"internal error: {type(exc).__name__}")
