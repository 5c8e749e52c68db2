"""WatchCampaign as a Python iterator that survives server restarts: on UNAVAILABLE it reconnects
with after_seq set to the last event it yielded, so the caller sees every event exactly once and
in order (each reconnection starts with a fresh snapshot)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import grpc

from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago_client.errors import from_rpc_error

#: Event types after which a campaign's stream ends.
FINAL_EVENTS = frozenset({"campaign.completed", "campaign.cancelled", "campaign.deleted"})
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE,)


def watch_campaign(
    stub: cs_grpc.CampaignServiceStub,
    metadata: Sequence[tuple[str, str]],
    campaign_id: str,
    *,
    after_seq: int = 0,
    timeout: float | None = None,
    reconnects: int = 30,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[cs.WatchCampaignResponse]:
    """Snapshot, then events, until the campaign is final; `timeout` bounds the whole watch."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = after_seq
    tries = 0
    while True:
        left = None if deadline is None else max(0.001, deadline - time.monotonic())
        call = stub.WatchCampaign(cs.WatchCampaignRequest(campaign_id=campaign_id, after_seq=last),
                                  metadata=tuple(metadata), timeout=left)
        try:
            for msg in call:
                if msg.WhichOneof("kind") == "event":
                    last = msg.event.seq
                    tries = 0
                yield msg
            return  # the server ended the stream: the campaign is final
        except grpc.RpcError as e:
            if e.code() not in RECONNECT_CODES or tries >= reconnects:  # type: ignore[attr-defined]
                err = from_rpc_error(e)
                raise err from err.__cause__
            tries += 1
            sleep(min(2.0, 0.1 * 2 ** tries))
        finally:
            call.cancel()
