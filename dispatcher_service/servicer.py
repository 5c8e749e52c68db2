"""grpc.aio DispatcherService: start, stop (confirmed) and inspect a campaign's lanes.

Internal API: only the service token is accepted. Errors follow DESIGN.md: INVALID_ARGUMENT with
BadRequest field violations, FAILED_PRECONDITION for stale epochs, NOT_FOUND, UNAVAILABLE when
Redis is down, INTERNAL for anything unexpected -- never UNKNOWN.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from arq.connections import ArqRedis

from dispatcher_service import errors, metrics
from dispatcher_service.config import Config
from dispatcher_service.store import Store
from whago.campaign.v1 import resources_pb2 as rpb
from whago.dispatcher.v1 import dispatcher_service_pb2 as pb
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as pbg

log = logging.getLogger("dispatcher.api")
R = TypeVar("R")


def rpc(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Auth + error mapping for every method: whatever escapes becomes errors.to_service_error's status."""

    observer = metrics.RpcObserver(pb.DESCRIPTOR.services_by_name["DispatcherService"].full_name, fn.__name__)

    @functools.wraps(fn)
    async def wrapper(self: DispatcherServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        started, code = time.perf_counter(), grpc.StatusCode.CANCELLED  # stays so when the task is cancelled
        try:
            self.authenticate(context)
            result = await fn(self, request, context)
            code = grpc.StatusCode.OK
            return result
        except grpc.aio.AbortError:
            code = grpc.StatusCode.UNKNOWN  # aborted by the method itself (none does today)
            raise
        except Exception as exc:
            err = errors.to_service_error(exc)
            code = err.code
            if isinstance(err, errors.Internal):
                log.exception("%s failed: %s", fn.__name__, exc)
            elif isinstance(err, errors.Unavailable):
                log.warning("%s: redis unavailable: %s", fn.__name__, exc)
            elif err.code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                log.info("%s refused: %s %s", fn.__name__, err.code.name, err.message)
            await context.abort_with_status(err.to_status())  # type: ignore[attr-defined]
        finally:
            observer.done(code, started)
        raise AssertionError("unreachable")  # abort_with_status always raises

    return wrapper


def _check_pacing(p: rpb.Pacing, prefix: str, v: list[tuple[str, str]]) -> None:
    mn = p.interval_min_seconds if p.HasField("interval_min_seconds") else None
    mx = p.interval_max_seconds if p.HasField("interval_max_seconds") else None
    if mn is not None and not mn >= 0:
        v.append((f"{prefix}.interval_min_seconds", "must be >= 0"))
    if mx is not None and not mx >= 0:
        v.append((f"{prefix}.interval_max_seconds", "must be >= 0"))
    if mn is not None and mx is not None and mn > mx:
        v.append((f"{prefix}.interval_min_seconds", "must not exceed interval_max_seconds"))
    if p.HasField("max_per_hour") and p.max_per_hour < 0:
        v.append((f"{prefix}.max_per_hour", "must be >= 0"))
    if p.HasField("max_per_day") and p.max_per_day < 0:
        v.append((f"{prefix}.max_per_day", "must be >= 0"))
    if p.HasField("window"):
        w = p.window
        wp = f"{prefix}.window"
        if not 0 <= w.start_hour <= 23:
            v.append((f"{wp}.start_hour", "must be 0-23"))
        if not 1 <= w.end_hour <= 24:
            v.append((f"{wp}.end_hour", "must be 1-24"))
        elif w.end_hour <= w.start_hour:
            v.append((f"{wp}.end_hour", "must be greater than start_hour"))
        if any(d < 1 or d > 7 for d in w.weekdays):
            v.append((f"{wp}.weekdays", "ISO weekdays are 1 (Monday) to 7 (Sunday)"))
        if w.timezone:
            try:
                ZoneInfo(w.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                v.append((f"{wp}.timezone", f"unknown IANA timezone {w.timezone!r}"))


def validate_start(req: pb.StartDispatchRequest) -> None:
    v: list[tuple[str, str]] = []
    if not req.campaign_id.strip():
        v.append(("campaign_id", "required"))
    elif len(req.campaign_id) > 200 or ":" in req.campaign_id:
        v.append(("campaign_id", "at most 200 characters, no ':'"))
    if req.epoch < 0:
        v.append(("epoch", "must be >= 0"))
    if not req.lanes:
        v.append(("lanes", "at least one lane is required"))
    seen: set[str] = set()
    for i, lane in enumerate(req.lanes):
        p = f"lanes[{i}]"
        if not lane.chip_id.strip():
            v.append((f"{p}.chip_id", "required"))
        elif ":" in lane.chip_id or len(lane.chip_id) > 200:
            v.append((f"{p}.chip_id", "at most 200 characters, no ':'"))
        elif lane.chip_id in seen:
            v.append((f"{p}.chip_id", f"duplicate chip {lane.chip_id}"))
        seen.add(lane.chip_id)
        u = urlparse(lane.waha_base_url)
        if u.scheme not in ("http", "https") or not u.netloc:
            v.append((f"{p}.waha_base_url", "must be an http(s) URL"))
        if not lane.waha_session.strip():
            v.append((f"{p}.waha_session", "required"))
        if lane.HasField("pacing"):
            _check_pacing(lane.pacing, f"{p}.pacing", v)
    c = req.camouflage
    if c.HasField("typing_chars_per_second") and not c.typing_chars_per_second > 0:
        v.append(("camouflage.typing_chars_per_second", "must be > 0"))
    if c.HasField("typing_max_seconds") and not 0 <= c.typing_max_seconds <= 60:
        v.append(("camouflage.typing_max_seconds", "must be 0-60"))
    if v:
        raise errors.InvalidArgument(v)


def validate_stop(campaign_id: str, epoch: int) -> None:
    v: list[tuple[str, str]] = []
    if not campaign_id.strip():
        v.append(("campaign_id", "required"))
    if epoch < 0:
        v.append(("epoch", "must be >= 0"))
    if v:
        raise errors.InvalidArgument(v)


class DispatcherServicer(pbg.DispatcherServiceServicer):
    """The DispatcherService implementation over Redis (fences, lane state, arq queue)."""

    def __init__(self, cfg: Config, redis: ArqRedis) -> None:
        self.cfg = cfg
        self.redis = redis
        self.store = Store(redis, cfg.queue_name)
        self.fences = self.store.fences
        self._token = cfg.service_token.encode()

    def authenticate(self, context: grpc.aio.ServicerContext) -> None:
        auth = ""
        for k, val in context.invocation_metadata() or ():
            if k == "authorization":
                auth = val if isinstance(val, str) else val.decode()
        if not auth:
            raise errors.Unauthenticated("missing authorization: Bearer <service token>")
        scheme, _, tok = auth.partition(" ")
        if scheme.lower() != "bearer" or not tok.strip():
            raise errors.Unauthenticated("authorization must be 'Bearer <token>'")
        if not hmac.compare_digest(tok.strip().encode(), self._token):
            raise errors.PermissionDenied("DispatcherService accepts only the service token")

    @rpc
    async def StartDispatch(self, request: pb.StartDispatchRequest,
                            context: grpc.aio.ServicerContext) -> pb.StartDispatchResponse:
        validate_start(request)
        c, e = request.campaign_id, request.epoch
        res = await self.fences.run(c, e)
        if res == "same":
            stored = await self.store.load_request(c)
            if stored is not None and stored.epoch == e:
                d = await self.store.get_dispatch(c)
                log.info("campaign=%s epoch=%d StartDispatch repeated: no new jobs", c, e)
                return pb.StartDispatchResponse(dispatch=d)
        # A new epoch: stale queued jobs of the old one are revoked (running ones stop at the fence).
        await self.store.stop_jobs(c)
        await self.store.save_dispatch(request, pb.DISPATCH_STATE_RUNNING)
        # All lanes in one pipeline (a 1000-lane campaign used to cost ~10 round trips per lane).
        jobs = await self.store.enqueue_lanes(c, [lane.chip_id for lane in request.lanes], e,
                                              state=pb.LANE_STATE_QUEUED, epoch=e, last_error="", next_send_time=0)
        log.info("campaign=%s epoch=%d StartDispatch: %d lanes enqueued (%s%s)", c, e, len(jobs),
                 ", ".join(jobs[:5]), ", …" if len(jobs) > 5 else "")
        d = await self.store.get_dispatch(c)
        return pb.StartDispatchResponse(dispatch=d)

    async def _stop(self, c: str, e: int, what: str,
                    then: Callable[[], Awaitable[object]] | None = None) -> tuple[int, int]:
        """Fence, then the drain of the requests in flight while the queued jobs are revoked and
        `then` runs: a stop waits for the longer of the two, not for their sum."""
        jobs: list[tuple[int, int]] = []

        async def alongside() -> None:
            jobs.append(await self.store.stop_jobs(c))
            if then is not None:
                await then()

        res, drained = await self.fences.stop(c, e, self.cfg.stop_wait_seconds, alongside=alongside)
        revoked, aborted = jobs[0]
        log.info("campaign=%s epoch=%d %s: fence set (%s), revoked=%d aborted=%d in-flight drained=%s",
                 c, e, what, res, revoked, aborted, drained)
        return revoked, aborted

    @rpc
    async def PauseDispatch(self, request: pb.PauseDispatchRequest,
                            context: grpc.aio.ServicerContext) -> pb.PauseDispatchResponse:
        validate_stop(request.campaign_id, request.epoch)
        c, e = request.campaign_id, request.epoch
        got: list[pb.Dispatch | None] = []

        async def mark_paused() -> None:
            req = await self.store.load_request(c)
            if req is not None:
                await self.store.pause_lanes(c, e, [lane.chip_id for lane in req.lanes])
            got.append(await self.store.get_dispatch(c) if req is not None else None)

        await self._stop(c, e, "PauseDispatch", then=mark_paused)
        d = got[0]
        return pb.PauseDispatchResponse(dispatch=d if d is not None else pb.Dispatch(
            campaign_id=c, epoch=e, state=pb.DISPATCH_STATE_PAUSED))

    @rpc
    async def CancelDispatch(self, request: pb.CancelDispatchRequest,
                             context: grpc.aio.ServicerContext) -> pb.CancelDispatchResponse:
        validate_stop(request.campaign_id, request.epoch)
        c, e = request.campaign_id, request.epoch
        revoked, aborted = await self._stop(c, e, "CancelDispatch")
        req = await self.store.load_request(c)
        await self.store.forget(c, [lane.chip_id for lane in req.lanes] if req is not None else [])
        return pb.CancelDispatchResponse(revoked_jobs=revoked, aborted_jobs=aborted)

    @rpc
    async def GetDispatch(self, request: pb.GetDispatchRequest, context: grpc.aio.ServicerContext) -> pb.Dispatch:
        if not request.campaign_id.strip():
            raise errors.InvalidArgument([("campaign_id", "required")])
        d = await self.store.get_dispatch(request.campaign_id)
        if d is None:
            raise errors.NotFound("DISPATCH_NOT_FOUND", f"no dispatch for campaign {request.campaign_id}",
                                  {"campaign_id": request.campaign_id})
        return d
