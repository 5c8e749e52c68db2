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
from dispatcher_service.group_commit import GroupCommit
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
        self.lease_lanes_supported = True

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

    async def lease_lanes(self, requests: Sequence[dpb.LeaseMessagesRequest]) -> Sequence[dpb.LeaseMessagesResponse]:
        """LeaseLanes (one campaign, one transaction); LeaseMessages per lease, side by side, against a
        campaign service without it (UNIMPLEMENTED: a rolling upgrade's older replica)."""
        if self.lease_lanes_supported:
            req = dpb.LeaseLanesRequest(leases=requests)
            try:
                resp = await self._call("LeaseLanes", lambda t: self.stub.LeaseLanes(
                    req, metadata=self.metadata, timeout=t, wait_for_ready=True))
                return resp.leases
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.warning("the campaign service has no LeaseLanes; leasing lane by lane")
                self.lease_lanes_supported = False
        return await asyncio.gather(*(self._call("LeaseMessages", lambda t, r=r: self.stub.LeaseMessages(  # type: ignore[misc]
            r, metadata=self.metadata, timeout=t, wait_for_ready=True)) for r in requests))

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


MEDIA_PIECE_BYTES = 8 * 1024 * 1024  # per GetMediaContent read; under both ends' message limits


# Reports of paced lanes come one or two at a time: left to themselves, ~1.5 a ReportDeliveries (a
# transaction and an RPC each). Fewer than REPORT_LINGER_BELOW waiting wait this long for more
# (10,000 lanes x 10 s: CPU per send 1.24 -> 1.13 ms at 20 ms; campaign_service 0.25 -> 0.20,
# PostgreSQL 0.22 -> 0.19). Bursting lanes' reports come hundreds at a time and never wait; a
# lane awaits its reports only where it has nothing to send meanwhile (between paced batches).
REPORT_LINGER_SECONDS = 0.02
REPORT_LINGER_BELOW = 50


class ReportBatcher:
    """Group commit of ReportDeliveries per campaign within a worker process.

    Every counting report takes the campaign row lock on the campaign side, so the reports of a
    campaign's lanes run one after another there anyway; 1000 lanes each reporting alone kept the
    campaign service's threads waiting on that lock (and its leases waiting for threads). Here at
    most one ReportDeliveries per campaign and kind is in flight per worker; reports arriving
    meanwhile go together in the next one. Every caller gets the answer of the RPC that carried its
    reports, or its error. ATTEMPTING-only reports go apart: they take no campaign lock and must
    stay that way (a lane records an attempt even while a Pause holds the row), and a send waits
    for its own, so they never linger.
    """

    def __init__(self, client: DeliveryClient, max_reports: int = 1000) -> None:
        self.client = client
        self._outcomes: GroupCommit[str, list[dpb.DeliveryReport], dpb.ReportDeliveriesResponse] = GroupCommit(
            self._send, len, max_reports, max_reports, linger=REPORT_LINGER_SECONDS, linger_below=REPORT_LINGER_BELOW)
        self._attempts: GroupCommit[str, list[dpb.DeliveryReport], dpb.ReportDeliveriesResponse] = GroupCommit(
            self._send, len, max_reports, max_reports)

    async def report(self, campaign_id: str, reports: Sequence[dpb.DeliveryReport],
                     budget: float | None = None) -> dpb.ReportDeliveriesResponse:
        attempts = all(r.outcome == dpb.DELIVERY_OUTCOME_ATTEMPTING for r in reports)
        return await (self._attempts if attempts else self._outcomes).submit(campaign_id, list(reports), budget)

    async def _send(self, campaign_id: str, items: list[list[dpb.DeliveryReport]],
                    budget: float | None) -> list[dpb.ReportDeliveriesResponse]:
        resp = await self.client.report(campaign_id, [r for rs in items for r in rs], budget=budget)
        return [resp] * len(items)


# A LeaseLanes call of a worker: at most this many lanes, and messages in all (the campaign
# service's own limits: 100 leases, 1000 messages). Every lease of a call holds the campaign row's
# share lock until the call's commit, and a Pause or Cancel waits for it: measured, 1-message
# leases cost ~0.6 ms a lane from 50 lanes a call on (2.9 ms for one alone, 0.8 ms a lane in tens),
# and 500 lanes held the lock 297 ms. 64 lanes keep a call near 40 ms, at no cost in CPU. Big
# leases gain little from sharing a call (their cost is per message).
LEASE_LANES_MAX = 64
LEASE_LANES_MAX_MESSAGES = 1000
LEASE_LANES_IN_FLIGHT = 2  # calls of a campaign at once (LeaseBatcher)


class LeaseBatcher:
    """Group commit of leases per campaign within a worker process: at most LEASE_LANES_IN_FLIGHT
    LeaseLanes per campaign at once; the leases lanes ask for meanwhile go together in the next
    one. 10,000 lanes starting each paid an RPC and a transaction of its own (~2 ms of the two
    services' CPU a lease, most of it not the lease's statements). Two at once, not one: the
    campaign service works them on two threads, and a bursting lane's next batch is then less
    often late (`dispatch`: 7,401-7,534 msg/s against 6,837-7,124 with one, 3 runs each)."""

    def __init__(self, client: DeliveryClient) -> None:
        self.client = client
        self._commit: GroupCommit[str, dpb.LeaseMessagesRequest, dpb.LeaseMessagesResponse] = GroupCommit(
            self._send, lambda r: r.max_messages, LEASE_LANES_MAX_MESSAGES, LEASE_LANES_MAX, LEASE_LANES_IN_FLIGHT)

    async def lease(self, request: dpb.LeaseMessagesRequest) -> dpb.LeaseMessagesResponse:
        return await self._commit.submit(request.campaign_id, request)

    async def _send(self, _campaign_id: str, items: list[dpb.LeaseMessagesRequest],
                    _budget: float | None) -> Sequence[dpb.LeaseMessagesResponse]:
        return await self.client.lease_lanes(items)
