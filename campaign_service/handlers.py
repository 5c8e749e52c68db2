"""Every method handler of campaign_service's gRPC server in one dict, served by one generic handler,
each handler wrapped once (campaign_service.interceptors) as it is registered.

Why not the generated `add_*_to_server` straight onto the grpc.aio server: they register each method
as a "registered method", and grpc.aio's server loop keeps one pending future per registered method
and `asyncio.wait`s on all of them (~70 here) for every incoming call; and a grpc.aio
ServerInterceptor adds two coroutine layers to every call. Both showed in the profile of `make bench`
figure `get` (GetCampaign QPS). Here an incoming call costs one dict lookup to find its handler.

The generated functions are pointed at a `Handlers` instead of the server (it has the two methods
they call), then `install(server)` adds it as the server's only generic handler."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

Wrap = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


class Handlers(grpc.GenericRpcHandler):
    def __init__(self, wrap: Wrap) -> None:
        self._wrap = wrap
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []  # handlers registered only that way, if any

    # -- what generated add_*_to_server functions call ------------------------------------------

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            self._handlers[method] = self._wrap(method, handler)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Generated code registers each service both ways; the dict answers those, so a generic
        handler is only asked for a method the dict does not know."""
        self._generic.extend(handlers)

    # -- grpc.GenericRpcHandler --------------------------------------------------------------------

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is not None or not self._generic:
            return handler
        for generic in self._generic:
            found = generic.service(handler_call_details)
            if found is not None:  # only methods some handler serves reach here: the dict stays bounded
                handler = self._handlers[method] = self._wrap(method, found)
                return handler
        return None

    def methods(self) -> list[str]:
        return list(self._handlers)

    def install(self, server: Any) -> None:
        server.add_generic_rpc_handlers((self,))
