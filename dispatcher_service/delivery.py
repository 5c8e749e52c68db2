"""grpc.aio client of whago.campaign.v1.DeliveryService.

The campaign service can restart or lose its database for a while. gRPC's own mechanisms cover
both, bounded by each call's budget (its deadline): `wait_for_ready` holds a call while the
service is unreachable until the channel reconnects, and the channel's retry policy (service
config) repeats an attempt that the service answered UNAVAILABLE, honouring its pushback. Every
call is safe to repeat (leases are keyed by owner and epoch, reports and receipts are idempotent)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from dispatcher_service import tracing
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import delivery_service_pb2_grpc as dgrpc
from whago.campaign.v1 import resources_pb2

log = logging.getLogger("dispatcher.delivery")
T = TypeVar("T")

# The statuses after which the service is taken as unreachable within the budget.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# round_robin: a target naming several campaign_service replicas (`ipv4:h:p1,h:p2`, or a DNS name
# with several addresses such as a scaled compose service) spreads the calls over all of them; with
# one address it is the same as the default pick_first.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [{
    "name": [{"service": "whago.campaign.v1.DeliveryService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class DeliveryUnavailable(Exception):
    """DeliveryService could not be reached within the retry budget."""


class DeliveryClient:
    """Leases and reports with the service token. `retry_budget` is each call's deadline (waiting
    for the service and gRPC's retries included); `call_timeout` bounds how long a caller waits for
    work that includes a call (e.g. a prefetched lease)."""

    def __init__(self, target: str, token: str, call_timeout: float = 30.0, retry_budget: float = 45.0) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS,
                                                 interceptors=tracing.client_interceptors())
        self.stub = dgrpc.DeliveryServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.call_timeout = call_timeout
        self.retry_budget = retry_budget

    async def close(self) -> None:
        await self.channel.close(None)

    async def _call(self, name: str, fn: Callable[[float], Awaitable[T]], budget: float | None = None) -> T:
        """fn(deadline seconds) makes the call; an unreachable service is DeliveryUnavailable."""
        try:
            return await fn(self.retry_budget if budget is None else budget)
        except grpc.aio.AioRpcError as e:
            if e.code() in UNREACHABLE:
                raise DeliveryUnavailable(f"{name}: {e.code().name} {e.details()}") from e
            raise

    async def lease(self, campaign_id: str, chip_id: str, epoch: int, max_messages: int, lease_seconds: int,
                    owner: str, waha_message_ids: Sequence[str] = (),
                    reclaim_owners: Sequence[str] = ()) -> dpb.LeaseMessagesResponse:
        req = dpb.LeaseMessagesRequest(campaign_id=campaign_id, chip_id=chip_id, epoch=epoch,
                                       max_messages=max_messages, lease_seconds=lease_seconds, lease_owner=owner,
                                       waha_message_ids=waha_message_ids, reclaim_owners=reclaim_owners)
        return await self._call("LeaseMessages", lambda t: self.stub.LeaseMessages(
            req, metadata=self.metadata, timeout=t, wait_for_ready=True))

    async def report(self, campaign_id: str, reports: Sequence[dpb.DeliveryReport],
                     budget: float | None = None) -> dpb.ReportDeliveriesResponse:
        req = dpb.ReportDeliveriesRequest(campaign_id=campaign_id, reports=list(reports))
        return await self._call("ReportDeliveries", lambda t: self.stub.ReportDeliveries(
            req, metadata=self.metadata, timeout=t, wait_for_ready=True), budget)

    async def chip_state(self, chip_id: str, state: resources_pb2.ChipState.ValueType,
                         reason: str) -> dpb.ReportChipStateResponse:
        req = dpb.ReportChipStateRequest(chip_id=chip_id, state=state, reason=reason)
        return await self._call("ReportChipState", lambda t: self.stub.ReportChipState(
            req, metadata=self.metadata, timeout=t, wait_for_ready=True))

    async def lane_wait(self, campaign_id: str, chip_id: str, epoch: int, resume_at: float,
                        reason: str) -> dpb.ReportLaneWaitResponse:
        """ReportLaneWait: this lane sends again at `resume_at` (epoch seconds), on purpose."""
        req = dpb.ReportLaneWaitRequest(campaign_id=campaign_id, chip_id=chip_id, epoch=epoch, reason=reason[:500])
        req.resume_time.FromNanoseconds(int(resume_at * 1e9))
        return await self._call("ReportLaneWait", lambda t: self.stub.ReportLaneWait(
            req, metadata=self.metadata, timeout=t, wait_for_ready=True), budget=min(10.0, self.retry_budget))

    async def acks(self, acks: Sequence[dpb.MessageAck]) -> dpb.ReportAcksResponse:
        """ReportAcks: WhatsApp receipts by WAHA message id."""
        req = dpb.ReportAcksRequest(acks=list(acks))
        return await self._call("ReportAcks", lambda t: self.stub.ReportAcks(
            req, metadata=self.metadata, timeout=t, wait_for_ready=True), budget=min(10.0, self.retry_budget))

    async def inbound(self, messages: Sequence[dpb.InboundMessage]) -> dpb.ReportInboundMessagesResponse:
        """ReportInboundMessages: messages the chips received (opt-outs), idempotent per WAHA id."""
        req = dpb.ReportInboundMessagesRequest(messages=list(messages))
        return await self._call("ReportInboundMessages", lambda t: self.stub.ReportInboundMessages(
            req, metadata=self.metadata, timeout=t, wait_for_ready=True), budget=min(10.0, self.retry_budget))

    async def media(self, media_id: str) -> dpb.GetMediaContentResponse:
        """The whole file, in ranged reads of MEDIA_PIECE_BYTES (a 100 MiB document is larger than one
        gRPC message); one response carrying the metadata and all the bytes."""
        pieces: list[bytes] = []
        offset = 0
        while True:
            req = dpb.GetMediaContentRequest(media_id=media_id, offset=offset, max_bytes=MEDIA_PIECE_BYTES)
            got = await self._call("GetMediaContent", lambda t, req=req: self.stub.GetMediaContent(  # type: ignore[misc]
                req, metadata=self.metadata, timeout=t, wait_for_ready=True))
            pieces.append(got.content)
            offset += len(got.content)
            if not got.content or offset >= got.media.size_bytes or len(got.content) < MEDIA_PIECE_BYTES:
                return dpb.GetMediaContentResponse(media=got.media, content=b"".join(pieces))


_Pending = tuple[list[dpb.DeliveryReport], float | None, "asyncio.Future[dpb.ReportDeliveriesResponse]"]


MEDIA_PIECE_BYTES = 8 * 1024 * 1024  # per GetMediaContent read; under both ends' message limits


class ReportBatcher:
    """Group commit of ReportDeliveries per campaign within a worker process.

    Every counting report takes the campaign row lock on the campaign side, so the reports of a
    campaign's lanes run one after another there anyway; 1000 lanes each reporting alone kept the
    campaign service's threads waiting on that lock (and its leases waiting for threads). Here at
    most one ReportDeliveries per (campaign, kind) is in flight per worker; reports arriving
    meanwhile go together in the next one. Every caller gets the answer of the RPC that carried its
    reports, or its error. ATTEMPTING-only reports are a separate kind: they take no campaign lock
    and must stay that way (a lane records an attempt even while a Pause holds the row).
    """

    def __init__(self, client: DeliveryClient, max_reports: int = 1000) -> None:
        self.client = client
        self.max_reports = max_reports
        self._queues: dict[tuple[str, bool], list[_Pending]] = {}
        self._drains: dict[tuple[str, bool], asyncio.Task[None]] = {}

    async def report(self, campaign_id: str, reports: Sequence[dpb.DeliveryReport],
                     budget: float | None = None) -> dpb.ReportDeliveriesResponse:
        key = (campaign_id, all(r.outcome == dpb.DELIVERY_OUTCOME_ATTEMPTING for r in reports))
        fut: asyncio.Future[dpb.ReportDeliveriesResponse] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((list(reports), budget, fut))
        if key not in self._drains:
            self._drains[key] = asyncio.ensure_future(self._drain(key))
        return await fut

    async def _drain(self, key: tuple[str, bool]) -> None:
        batch: list[_Pending] = []
        try:
            for _ in range(1_000_000):
                q = self._queues.get(key)
                if not q:
                    break
                batch, n = [], 0
                while q and (not batch or n + len(q[0][0]) <= self.max_reports):
                    item = q.pop(0)
                    batch.append(item)
                    n += len(item[0])
                if not q:
                    self._queues.pop(key, None)
                budgets = [b for _, b, _ in batch if b is not None]
                try:
                    resp = await self.client.report(key[0], [r for rs, _, _ in batch for r in rs],
                                                    budget=min(budgets) if budgets else None)
                except asyncio.CancelledError:
                    raise
                except BaseException as e:
                    for _, _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    batch = []
                    continue
                for _, _, f in batch:
                    if not f.done():
                        f.set_result(resp)
                batch = []
        finally:
            self._drains.pop(key, None)
            for _, _, f in batch + self._queues.pop(key, []):
                if not f.done():
                    f.cancel()
