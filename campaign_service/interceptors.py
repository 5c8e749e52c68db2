"""The cross-cutting parts of every RPC in one wrapper around each method handler: authentication,
the per-user rate limit, metrics, the tracing span and the translation of errors into gRPC statuses.
It wraps the handler's behaviour, so it runs where the servicer runs (the RPC thread pool for the
unary handlers, the event loop for the coroutines) and can set the caller in a ContextVar there.

Applied once per method when the server is built (campaign_service.handlers), not as a grpc.aio
ServerInterceptor: grpc.aio runs an interceptor as two more coroutine layers on every call."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import redis
from google.protobuf.message import Message
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from campaign_service import auth, errors, metrics, tracing
from campaign_service.db import aio
from campaign_service.limits import RateLimiter
from campaign_service.text_fields import first_nul_field

log = logging.getLogger("campaign_service.rpc")

INTERNAL_SERVICES = ("whago.campaign.v1.DeliveryService",)
PUBLIC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                   "grpc.reflection.v1.ServerReflection")


#: Keys up to this long are cached as they are; longer ones (none we issue is) by their hash, so a
#: flood of huge invalid keys cannot grow the cache's memory.
_MAX_CACHED_KEY = 128


class KeyCache:
    """API key -> the user's Principal, with a short TTL so revoked keys stop working quickly.
    Cached by the key itself: hashing it (what the database keeps) cost more than the rest of a
    cached lookup, on every RPC."""

    def __init__(self, lookup: Callable[[str], uuid.UUID | None], ttl: float = 30.0) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._cache: dict[str, tuple[float, auth.Principal | None]] = {}

    def principal_for(self, key: str, cached_only: bool = False) -> auth.Principal | None:
        ck = key if len(key) <= _MAX_CACHED_KEY else auth.hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(ck)
        if hit is not None and hit[0] > now:
            return hit[1]
        if cached_only:
            raise auth.NeedsLookup
        user = self._lookup(auth.hash_key(key))
        if len(self._cache) > 10_000:
            self._cache.clear()
        principal = None if user is None else auth.Principal(user_id=user)
        self._cache[ck] = (now + self._ttl, principal)
        return principal

    def user_for(self, key: str) -> uuid.UUID | None:
        p = self.principal_for(key)
        return None if p is None else p.user_id


def to_service_error(exc: BaseException) -> errors.ServiceError:
    if isinstance(exc, errors.ServiceError):
        return exc
    if isinstance(exc, (OperationalError, PoolTimeout)) or (
            isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return errors.Unavailable("database unavailable, retry later")
    if isinstance(exc, aio.CONNECTION_ERRORS):  # the same, from the reads on the event loop
        return errors.Unavailable("database unavailable, retry later")
    if isinstance(exc, redis.exceptions.ConnectionError):
        return errors.Unavailable("redis unavailable, retry later")
    return errors.Internal("internal error")


_SERVICE_PRINCIPAL = auth.Principal(user_id=None, is_service=True)


def _translate(method: str, exc: BaseException) -> errors.ServiceError:
    """The status an exception answers, the same for every RPC; an internal error is logged (with
    its traceback: this runs inside the handler's except block)."""
    err = to_service_error(exc)
    if isinstance(err, errors.Internal):
        log.exception("rpc=%s internal error", method)
    return err


def refuse_nul(request: Any) -> None:
    """A request message (not a client stream: imports drop NULs row by row) with a NUL in a string."""
    if isinstance(request, Message) and (field := first_nul_field(request)) is not None:
        raise errors.InvalidArgument([(field, "must not contain NUL (U+0000) characters")])


def _abort(context: Any, err: errors.ServiceError) -> None:
    """Abort a sync handler's call (grpc.aio's sync context has no abort_with_status)."""
    status = err.to_status()
    context.abort(status.code, status.details, status.trailing_metadata)


class RpcWrapper:
    """`wrap(method, handler)`: the handler with every cross-cutting part of an RPC around it."""

    def __init__(self, keys: KeyCache, service_token: str, limiter: RateLimiter | None = None) -> None:
        self._keys = keys
        self._service_token = service_token
        self._limiter = limiter

    def _principal(self, service: str, metadata: Any, cached_only: bool = False) -> auth.Principal | None:
        """The caller; with `cached_only`, NeedsLookup rather than a query (key or rate not cached)."""
        if service in PUBLIC_SERVICES:
            return None
        token = auth.bearer_token(metadata)
        if token is None:
            raise errors.Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        internal = service in INTERNAL_SERVICES
        if auth.is_service_token(token, self._service_token):
            if internal:
                return _SERVICE_PRINCIPAL
            raise errors.PermissionDenied("the service token is for internal RPCs only")
        principal = self._keys.principal_for(token, cached_only)
        if principal is None:
            raise errors.Unauthenticated("invalid API key")
        if internal:
            raise errors.PermissionDenied(f"{service} is internal: user credentials are refused")
        if self._limiter is not None and principal.user_id is not None:
            self._limiter.take(principal.user_id, cached_only)
        return principal

    def wrap(self, method: str, handler: Any) -> Any:
        """`handler` (a grpc.RpcMethodHandler of `method`, "/package.Service/Method") wrapped."""
        service = method.rsplit("/", 2)[-2] if method.count("/") >= 2 else method
        principal_of = self._principal
        set_current, reset_current = auth.set_current, auth.reset_current
        observer = metrics.RpcObserver(method)
        clock, ok, cancelled = time.perf_counter, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                token = None
                started, code = clock(), ok
                try:
                    token = set_current(principal_of(service, context.invocation_metadata()))
                    refuse_nul(request_or_iterator)
                    return behavior(request_or_iterator, context)
                except Exception as exc:
                    err = _translate(method, exc)
                    code = err.code
                    _abort(context, err)
                finally:
                    observer.done(code, started)
                    if token is not None:
                        reset_current(token)
            return tracing.traced(method, run) if tracing.enabled() else run

        async def principal_lookup(metadata: Any) -> Any:
            """A caller whose key or rate is not cached: PostgreSQL is asked from a thread."""
            return await asyncio.get_running_loop().run_in_executor(None, principal_of, service, metadata)

        def wrap_async(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def run(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started, code = clock(), cancelled  # stays CANCELLED when the task is cancelled
                try:
                    metadata = context.invocation_metadata()
                    try:  # from the caches, on the loop (no coroutine of its own: this is every call)
                        principal = principal_of(service, metadata, True)
                    except auth.NeedsLookup:
                        principal = await principal_lookup(metadata)
                    set_current(principal)  # this task's own context
                    refuse_nul(request_or_iterator)
                    result = await behavior(request_or_iterator, context)
                    code = ok
                    return result
                except Exception as exc:
                    err = _translate(method, exc)
                    code = err.code
                finally:
                    observer.done(code, started)
                status = err.to_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            return tracing.traced_async(method, run) if tracing.enabled() else run

        def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                err: errors.ServiceError | None = None
                started, code = clock(), cancelled  # stays CANCELLED when the client goes away
                try:
                    metadata = context.invocation_metadata()
                    try:
                        principal = principal_of(service, metadata, True)
                    except auth.NeedsLookup:
                        principal = await principal_lookup(metadata)
                    set_current(principal)  # this task's own context
                    refuse_nul(request)
                    async for item in behavior(request, context):
                        yield item
                    code = ok
                except Exception as exc:
                    err = _translate(method, exc)
                    code = err.code
                finally:
                    observer.done(code, started)
                if err is not None:
                    status = err.to_status()
                    await context.abort(status.code, status.details, status.trailing_metadata)
            return tracing.traced_stream(method, run) if tracing.enabled() else run

        def wrap_any(behavior: Callable[..., Any]) -> Callable[..., Any]:
            return wrap_async(behavior) if inspect.iscoroutinefunction(behavior) else wrap(behavior)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_any(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_any(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        return handler  # other streams: health Watch, reflection (public, no wrapping needed)
