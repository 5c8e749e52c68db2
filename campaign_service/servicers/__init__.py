"""gRPC servicers: protobuf <-> campaign_service.ops, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from campaign_service.ops.inputs import Idem, Replayed

M = TypeVar("M")


def idem(request_id: str, method: str, encode: Callable[[Any], Any]) -> Idem | None:
    """An Idem whose stored response is the serialized protobuf the RPC returns."""
    if not request_id:
        return None
    return Idem(request_id, method, lambda result: encode(result).SerializeToString())


def unwrap(result: Any, response_cls: Callable[[], M], to_proto: Callable[[Any], M]) -> M:
    """The response: the replayed bytes of an earlier identical request, or the fresh result."""
    if isinstance(result, Replayed):
        msg = response_cls()
        msg.ParseFromString(result.data)  # type: ignore[attr-defined]
        return msg
    return to_proto(result)
