"""Sync gRPC client of whago.dispatcher.v1.DispatcherService, used inside lifecycle transactions.

Any failure to get an answer becomes errors.Unavailable, so the caller rolls back and the
campaign stays as it was."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from campaign_service import convert, errors, pacing, tracing
from campaign_service.secrets_box import SecretBox
from whago.campaign.v1 import resources_pb2 as res
from whago.dispatcher.v1 import dispatcher_service_pb2 as dpb
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as dgrpc

log = logging.getLogger("campaign_service.dispatch")
T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True)
class Lane:
    """Where and how one chip of a campaign sends."""

    chip_id: str
    waha_base_url: str
    waha_session: str
    waha_api_key: str
    pacing: res.Pacing


def lane_for(chip: Any, campaign_pacing: res.Pacing, box: SecretBox) -> Lane:
    """The one place a chip becomes a lane: its pacing intersected with the campaign's (with its
    warm-up plan), its WAHA API key opened (it is sealed at rest) only here, on its way to the
    dispatcher."""
    return Lane(chip_id=str(chip.id), waha_base_url=chip.waha_base_url, waha_session=chip.waha_session,
                waha_api_key=box.open(chip.waha_api_key),
                pacing=pacing.with_warmup(pacing.effective(convert.pacing_from_json(chip.pacing), campaign_pacing),
                                          convert.warmup_from_json(chip.warmup)))


@dataclass(frozen=True)
class CancelOutcome:
    revoked_jobs: int
    aborted_jobs: int


class DispatcherClient:
    """One channel per process; every call carries the service token and a deadline."""

    def __init__(self, target: str, service_token: str, timeout: float) -> None:
        self._target = target
        self._metadata = (("authorization", f"Bearer {service_token}"),)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: dgrpc.DispatcherServiceStub | None = None

    def _get_stub(self) -> dgrpc.DispatcherServiceStub:
        with self._lock:
            if self._stub is None:
                self._channel = grpc.insecure_channel(self._target, options=CHANNEL_OPTIONS)
                self._stub = dgrpc.DispatcherServiceStub(tracing.client_channel(self._channel))
            return self._stub

    def _call(self, name: str, campaign_id: str, fn: Callable[[dgrpc.DispatcherServiceStub], T]) -> T:
        try:
            return fn(self._get_stub())
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            log.warning("campaign=%s DispatcherService.%s failed: %s %s", campaign_id, name,
                        getattr(code, "name", code), details)
            raise errors.Unavailable(
                f"dispatcher unavailable ({name}: {getattr(code, 'name', code)}); the campaign was not changed",
                retry_after_seconds=2) from exc

    def start(self, campaign_id: str, epoch: int, lanes: list[Lane], camouflage: res.Camouflage) -> dpb.Dispatch:
        req = dpb.StartDispatchRequest(campaign_id=campaign_id, epoch=epoch, camouflage=camouflage, lanes=[
            dpb.LaneSpec(chip_id=ln.chip_id, waha_base_url=ln.waha_base_url, waha_session=ln.waha_session,
                         waha_api_key=ln.waha_api_key, pacing=ln.pacing) for ln in lanes])
        resp: Any = self._call("StartDispatch", campaign_id, lambda s: s.StartDispatch(
            req, metadata=self._metadata, timeout=self._timeout))
        return resp.dispatch  # type: ignore[no-any-return]

    def pause(self, campaign_id: str, epoch: int) -> dpb.Dispatch:
        req = dpb.PauseDispatchRequest(campaign_id=campaign_id, epoch=epoch)
        resp: Any = self._call("PauseDispatch", campaign_id, lambda s: s.PauseDispatch(
            req, metadata=self._metadata, timeout=self._timeout))
        return resp.dispatch  # type: ignore[no-any-return]

    def cancel(self, campaign_id: str, epoch: int) -> CancelOutcome:
        req = dpb.CancelDispatchRequest(campaign_id=campaign_id, epoch=epoch)
        resp: Any = self._call("CancelDispatch", campaign_id, lambda s: s.CancelDispatch(
            req, metadata=self._metadata, timeout=self._timeout))
        return CancelOutcome(int(resp.revoked_jobs), int(resp.aborted_jobs))

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._stub = None
